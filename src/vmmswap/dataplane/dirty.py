"""Dirty tracking across swap cycles: which guest pages still equal their swap-file copy.

Why: vmm-swap runs in cycles (idle: enable, out; busy again: disable; idle again: enable ...).
Without tracking every cycle copies every resident page to staging inside the freeze and writes
all of it to the file again, although most of it did not change since the last ``out``. A page
that came back from its file slot and was not written since still *is* its slot: it can leave
guest memory without a copy (the slot becomes current again) and ``out`` need not write it.

How the kernel tells us (Linux 6.7+): guest memory is registered with userfaultfd ``MISSING |
WP`` on a uffd with ``WP_ASYNC``. Pages filled with ``UFFDIO_COPY_MODE_WP`` are mapped
write-protected; a write to one is resolved by the kernel itself (no message, no round trip)
and leaves the page table entry *written*. ``PAGEMAP_SCAN`` on each process's pagemap reports
the written entries and protects them again in the same walk. Measured on this kernel (see
``tests/dataplane/test_dp_dirty_kernel.py``): an entry that was never protected, or whose
written entry was zapped (``MADV_DONTNEED``), also reports *written*; protected entries survive
a hole punch as markers; a ``pwrite`` to the memfd is seen by no page table at all.

**Safety** (the rules that keep a stale slot from being served where the guest wrote):

* a page is *clean* (:class:`~vmmswap.dataplane.kept_file.KeptFile`) only from the moment a
  write-protected COPY from its file slot succeeded, and only for pages the COPY filled (an
  EEXIST page is someone else's);
* at the next enable, with every mapping process frozen, a clean page is released without a copy
  only when no process reports it written *and* every process's scan covered every page of every
  region with an async-WP registration (:func:`scan_process`): a dead process, an unregistered
  mapping or a registration without WP fails that check, and then every page counts as written;
* a device process that leaves, a REMOVE, a move to staging, a monitor restart forget clean bits;
* nothing may write guest memory through the file (``pwrite`` to the memfd): no page table
  sees it. vmmswap's own code never does; a VMM that does must not turn tracking on.
"""

from __future__ import annotations

import errno
import logging
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.metrics import StatusFormatError, parse_object, parse_u64
from vmmswap.dataplane.page_store import Region
from vmmswap.kernel.pagemap import PageCategory
from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.pagemap_scan import Pagemap, WrittenScan
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import VMM_SWAP_FEATURES, Userfaultfd

__all__ = ["DIRTY_TRACKING_FEATURES", "TrackingMode", "TrackingStats",
           "probe_tracking", "scan_process", "swap_features"]

_log = logging.getLogger(__name__)

#: The uffd features tracking needs: WP faults, WP on shmem/hugetlbfs, resolved by the kernel.
DIRTY_TRACKING_FEATURES: Final = (Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM
                                  | Feature.WP_ASYNC)


class TrackingMode:
    """What the status reports as ``dirty_tracking.mode``."""

    WP_ASYNC: Final = "wp-async"
    OFF: Final = "off"


@dataclass(frozen=True, slots=True)
class TrackingSupport:
    """Whether this kernel can track, and if not, why (from its feature report, never its
    version)."""

    available: bool
    reason: str


def probe_tracking() -> TrackingSupport:
    """Ask the kernel: the uffd feature report, then one PAGEMAP_SCAN of our own memory."""
    try:
        support = Userfaultfd.probe()
    except OSError as err:
        return TrackingSupport(False, f"userfaultfd is not available: {err.strerror}")
    missing = DIRTY_TRACKING_FEATURES & ~support.features
    if missing:
        return TrackingSupport(False, f"the kernel lacks the uffd features {missing!r}")
    probe = mmap.mmap(-1, PAGE_SIZE)
    try:
        with Pagemap.open() as pagemap:
            start = np.frombuffer(probe, dtype=np.uint8).ctypes.data
            pagemap.scan(start, start + PAGE_SIZE, Pagemap.regions(1))
    except OSError as err:
        if err.errno == errno.ENOTTY:
            return TrackingSupport(False, "the kernel has no PAGEMAP_SCAN (Linux 6.7+)")
        return TrackingSupport(False, f"PAGEMAP_SCAN failed: {err}")
    finally:
        probe.close()
    return TrackingSupport(True, "")


def swap_features() -> Feature:
    """The features a vmm-swap uffd (the VMM's, a device's) asks for: MISSING on shmem and
    REMOVE, plus the dirty-tracking ones where the kernel has them. They cost nothing unless a
    range is registered with WP, and the uffd's creator cannot know whether the monitor will
    track (the monitor falls back to MISSING for a uffd without them)."""
    try:
        supported = Userfaultfd.probe().features
    except OSError:
        return VMM_SWAP_FEATURES
    extra = DIRTY_TRACKING_FEATURES if DIRTY_TRACKING_FEATURES in supported else Feature(0)
    return VMM_SWAP_FEATURES | extra


@dataclass(frozen=True, slots=True)
class TrackingStats:
    """The ``dirty_tracking`` part of the status.

    ``kept_pages``: pages in guest memory whose file slot still holds their content (as long as
    nobody writes them: the file space they keep is that many pages). ``dirty_pages`` and
    ``released_pages`` are the last enable's: clean pages found written (copied as usual) and
    clean pages that left guest memory without a copy. ``reason`` says why tracking is off.
    """

    mode: str = TrackingMode.OFF
    kept_pages: int = 0
    dirty_pages: int = 0
    released_pages: int = 0
    released_total_pages: int = 0
    #: The last enable's scan of every process's pagemap (inside the freeze).
    scan_seconds: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "kept_pages": self.kept_pages,
                "dirty_pages": self.dirty_pages, "released_pages": self.released_pages,
                "released_total_pages": self.released_total_pages,
                "scan_seconds": self.scan_seconds, "reason": self.reason}

    @classmethod
    def from_dict(cls, value: Any) -> TrackingStats:
        """Parse :meth:`to_dict` output strictly (None: a status without the key, as from
        crosvm or an older monitor: tracking off)."""
        if value is None:
            return cls()
        value = parse_object(value, "dirty_tracking")
        keys = set(cls().to_dict())
        if set(value) != keys:
            raise StatusFormatError(f"dirty_tracking: expected keys {sorted(keys)}, got "
                                    f"{sorted(value)}")
        mode, reason, scan = value["mode"], value["reason"], value["scan_seconds"]
        if mode not in (TrackingMode.WP_ASYNC, TrackingMode.OFF) or not isinstance(reason, str):
            raise StatusFormatError(f"dirty_tracking: bad mode {mode!r} or reason {reason!r}")
        if isinstance(scan, bool) or not isinstance(scan, int | float) or not 0 <= scan < 1e9:
            raise StatusFormatError(f"dirty_tracking.scan_seconds: bad value {scan!r}")
        counts = {k: parse_u64(value[k], f"dirty_tracking.{k}") for k in keys
                  if k not in ("mode", "reason", "scan_seconds")}
        return cls(mode=mode, reason=reason, scan_seconds=float(scan), **counts)


#: A page-table entry that is neither present nor swapped (nor a protection marker).
_EMPTY: Final = PageCategory.PRESENT | PageCategory.SWAPPED


def scan_process(pagemap: Pagemap, regions: Sequence[Region],
                 written: npt.NDArray[np.bool_],
                 protect: Callable[[int, int], None] | None = None) -> bool:
    """Add to ``written`` (one slot per guest page) the pages this process wrote since their
    last protection, and protect them again. Returns False when the answer cannot be trusted:
    some page of a region is not in an async-WP registered mapping of the process (it exited,
    unmapped, or registered without WP) -- PAGEMAP_SCAN skips such mappings silently, so the
    coverage is checked *after* the written scan, and a process that died in between is caught.
    OSError from the kernel propagates (the caller counts every page as written then).

    hugetlbfs regions need ``protect(addr, length)`` (UFFDIO_WRITEPROTECT through the
    process's uffd): there an empty entry reads as *not* written even when a written page was
    zapped from it (measured on 6.18; small pages read as written), and the scan's
    re-protection does not mark empty entries. So empty entries count as written, and the
    whole region is protected afterwards (markers in the empty entries), which makes an empty
    entry at the next scan mean "dropped since": written, as far as anyone can tell.
    """
    out = Pagemap.regions(16)
    for region in regions:
        dirty = written[region.base_page:region.end_page]
        WrittenScan(pagemap, region.host_addr, dirty, reprotect=True,
                    page_size=region.page_size).run()
        if region.page_size != PAGE_SIZE:
            if protect is None:
                raise ValueError("a hugetlbfs region needs protect(addr, length) to be "
                                 "scanned")
            WrittenScan(pagemap, region.host_addr, dirty, reprotect=False,
                        page_size=region.page_size, require=_EMPTY, inverted=_EMPTY).run()
            protect(region.host_addr, region.size)
    for region in regions:
        covered, pos = 0, region.host_addr
        while pos < region.host_end:
            result = pagemap.scan(pos, region.host_end, out, require=PageCategory.WPALLOWED,
                                  report=PageCategory.WPALLOWED)
            covered += int((result.regions["end"] - result.regions["start"]).sum())
            if result.complete:
                break
            if result.walk_end <= pos:
                return False
            pos = result.walk_end
        if covered != region.size:
            return False
    return True
