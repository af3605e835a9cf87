"""Giving a THP guest its huge pages back after disable.

A guest on shmem transparent huge pages keeps its TLB reach only while the VMM maps guest
memory with PMDs. Every page vmm-swap brings back is filled with UFFDIO_COPY, which allocates
small pages, so after ``disable`` the guest would run on 4 KiB pages for good (measured: 1 GiB
PMD-mapped before enable, 0 after disable). The monitor therefore notes, at the first enable,
which regions the VMM had PMD-mapped (``ShmemPmdMapped`` in its smaps), and once disable has
unregistered them it collapses those regions back (``MADV_COLLAPSE`` through
``process_madvise`` on the VMM: 1 GiB in about 1.7 s here) on a helper thread, so the event
loop keeps serving clients meanwhile. Regions that had no huge pages are left alone: a guest
the VMM put on small pages stays on them.

Best effort: a collapse the kernel refuses (``process_madvise`` of another process needs
CAP_SYS_NICE; pinned pages; no free huge page) is logged, and the data is unchanged either way.
The next enable waits for a running collapse first, so the two never overlap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence

from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.dataplane.huge_pages import collapse, pmd_mapped_bytes

_log = logging.getLogger(__name__)


class HugePageRestorer:
    """Per-VM state: the regions to collapse after disable, and the collapse thread."""

    def __init__(self, pid: int, regions: Sequence[RegionSpec]) -> None:
        self._pid = pid
        self._regions = tuple(regions)
        self._huge: list[RegionSpec] = []
        self._thread: threading.Thread | None = None
        #: Bytes PMD-mapped before enable and after the last collapse (for status and tests).
        self.before = 0
        self.after: int | None = None
        self.error: str | None = None

    def note_before(self) -> None:
        """At the first enable, before any page moves: which regions are on huge pages."""
        self.join()
        self._huge = []
        self.before = 0
        for spec in self._regions:
            try:
                mapped = pmd_mapped_bytes(self._pid, spec.host_addr, spec.host_end)
            except (OSError, ValueError) as err:  # a VMA straddling the region, a dead VMM
                _log.debug("cannot read PMD-mapped bytes of %s: %s", spec, err)
                continue
            if mapped:
                self._huge.append(spec)
                self.before += mapped

    @property
    def pending(self) -> bool:
        """Whether regions wait for their huge pages to be restored after disable."""
        return bool(self._huge)

    def restore_async(self) -> None:
        """After disable (every region unregistered): collapse the regions noted before."""
        if not self._huge:
            return
        self.join()
        regions, self._huge = self._huge, []
        self._thread = threading.Thread(target=self._restore, args=(regions,),
                                        name="vmmswap-collapse", daemon=True)
        self._thread.start()

    def _restore(self, regions: list[RegionSpec]) -> None:
        after = 0
        for spec in regions:
            try:
                collapse(self._pid, spec.host_addr, spec.size)
            except OSError as err:
                self.error = f"collapsing [{spec.host_addr:#x}, {spec.host_end:#x}): {err}"
                _log.warning("guest memory stays on small pages: %s", self.error)
            with contextlib.suppress(OSError, ValueError):  # the VMM may be gone
                after += pmd_mapped_bytes(self._pid, spec.host_addr, spec.host_end)
        self.after = after
        _log.info("huge pages after disable: %d of %d bytes PMD-mapped", after, self.before)

    def join(self) -> None:
        """Wait for a running collapse."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
