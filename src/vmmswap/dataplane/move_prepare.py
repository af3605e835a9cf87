"""The part of an enable that can run before the VMM is frozen.

Measured on the nested CI host (2 vCPUs, 6.18): ``copy_file_range`` from a guest memfd into
staging pages that do not exist yet runs at about 3 GB/s, because the kernel allocates and zeroes
every destination page inside the copy; into pages that already exist and are mapped, a
``preadv`` from the memfd runs at 4.5 GB/s per thread (8-9 GB/s on two), and the guest-side hole
punch at about 25 GB/s. Allocating and mapping the staging pages is what can be done while the
guest still runs: nothing reads them and no bit says they hold anything.

So :func:`prepare_staging` sizes the resident set (SEEK_DATA over each 4 KiB-page region's memfd)
and populates the matching staging pages (MADV_POPULATE_WRITE through the staging mapping), up
to a memory budget (staging briefly holds a second copy of what it prepares: the guest's pages
are freed only by the move). The move, frozen, re-reads the data extents -- they are the truth,
the guest kept running meanwhile -- and copies into whatever is there; a page that became
resident meanwhile is allocated in the move as before, and a prepared page whose guest page
was discarded meanwhile is a leftover the move's sweep frees.

Nothing here changes where a page *is*: the bits are untouched, guest memory is only looked at
(SEEK_DATA), and a populated staging page with a clear bit is exactly the leftover a successor's
sweep already frees (see DESIGN.md, "Crash consistency"). hugetlbfs regions are not prepared:
their move stages only non-zero huge pages, which only reading them tells.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from vmmswap.dataplane.guest_memory import data_ranges
from vmmswap.dataplane.staging import StagingMemory
from vmmswap.uffd.pagesize import PAGE_SIZE

_log = logging.getLogger(__name__)

#: Prepare at most this share of the memory the kernel (and the monitor's cgroup) says is
#: available: the prepared pages are a second copy until the move frees the guest's.
BUDGET_SHARE: Final = 0.5
#: Pages populated per system call (bounded so one call stays short).
_STEP_PAGES: Final = 16384


@dataclass(frozen=True, slots=True)
class PrepareRegion:
    """What preparing needs of one region (4 KiB pages only)."""

    memfd: int
    size: int
    base_page: int
    page_size: int


@dataclass(slots=True)
class Prepared:
    """What :func:`prepare_staging` did."""

    resident_pages: int = 0
    prepared_pages: int = 0
    #: Why fewer pages than resident were prepared (budget, an error), or None.
    limited: str | None = None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None if unlimited."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            path = next((line.split(":", 2)[2].strip() for line in f
                         if line.startswith("0::")), None)
        if path is None:
            return None
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        with open(os.path.join(base, "memory.max"), encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current"), encoding="ascii") as f:
            current = int(f.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError, IndexError):
        return None


def memory_budget() -> int:
    """Bytes of staging worth preparing now (0 if nothing can be told)."""
    known = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    if not known:
        return 0
    return int(min(known) * BUDGET_SHARE)


def prepare_staging(regions: Sequence[PrepareRegion], staging: StagingMemory, *,
                    budget: int | None = None,
                    between: Callable[[], object] | None = None) -> Prepared:
    """Populate the staging pages that the guest's resident pages will move to.

    Runs while the VMM runs; changes no page's place (see the module docstring). Errors are
    logged and end the preparation early (the move then allocates as it goes): preparing is
    only ever a speed-up. ``between`` is called after every step (at most ``_STEP_PAGES``
    pages, ~20 ms): the monitor serves waiting faults there. Anything it does to staging is
    safe: a punch it causes may hit a populated page (only the speed-up is lost), and the move
    flushes every pending punch before its first copy.
    """
    if budget is None:
        budget = memory_budget()
    out = Prepared()
    began = time.monotonic()
    # A punch still pending from a page that left staging would free what is populated here.
    staging.flush()
    left = budget // staging.page_size
    for region in regions:
        if region.page_size != PAGE_SIZE or staging.page_size != PAGE_SIZE:
            continue
        ps = region.page_size
        try:
            extents = list(data_ranges(region.memfd, region.size))
        except OSError as err:
            out.limited = f"sizing the resident set: {err}"
            _log.warning("preparing staging: %s", out.limited)
            break
        for start, end in extents:
            first = region.base_page + start // ps
            last = region.base_page + (end + ps - 1) // ps
            out.resident_pages += last - first
            pos = first
            while pos < last and left > 0 and out.limited is None:
                stop = min(last, pos + _STEP_PAGES, pos + left)
                try:
                    staging.populate(pos, stop)
                except OSError as err:
                    out.limited = f"populating staging: {err}"
                    _log.warning("preparing staging stopped early: %s", err)
                    break
                out.prepared_pages += stop - pos
                left -= stop - pos
                pos = stop
                if between is not None:
                    between()
    if out.limited is None and out.prepared_pages < out.resident_pages:
        out.limited = f"memory budget ({budget} bytes)"
    _log.info("staging prepared for %d of %d resident pages in %.3f s%s", out.prepared_pages,
              out.resident_pages, time.monotonic() - began,
              f" (limited by {out.limited})" if out.limited else "")
    return out
