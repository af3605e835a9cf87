"""The swap file's copies kept across a disable: which pages are clean, and releasing them.

With dirty tracking (:mod:`vmmswap.dataplane.dirty`) a page that came back from its file slot
through a write-protected COPY stays *clean* -- identical to its slot -- until some process
writes it. :class:`KeptFile` holds one bit per guest page for that (a bitmap, never a Python
object per page) and, at the next enable, turns the clean pages no process wrote back into
file pages: the slot becomes current and guest memory is punched, without a copy to staging or
a write to the file.

The bits are private to one page handler: a successor monitor starts with none (whatever the
dead one knew is forgotten, which costs a copy, never a wrong page).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.crash_points import crash_point
from vmmswap.dataplane.dirty import TrackingMode, TrackingStats
from vmmswap.dataplane.guest_memory import data_ranges
from vmmswap.dataplane.page_fill import FillOutcome
from vmmswap.dataplane.page_store import Region
from vmmswap.dataplane.present_list import PresentList
from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.uffd.pagesize import PAGE_SIZE

__all__ = ["KeptFile"]

_log = logging.getLogger(__name__)


class KeptFile:
    """Clean pages (in guest memory and equal to their file slot unless written) over the
    handler's ``regions`` and ``swap_file``."""

    def __init__(self, regions: Sequence[Region], swap_file: SwapFile) -> None:
        self.regions = tuple(regions)
        self.swap_file = swap_file
        self.page_size = self.regions[0].page_size
        self.num_pages = sum(r.num_pages for r in self.regions)
        self.bits = PresentList(self.num_pages)
        #: The last enable's figures (see TrackingStats).
        self.dirty_pages = 0
        self.released_pages = 0
        self.released_total_pages = 0

    # --- the bits -------------------------------------------------------------------------------
    def note_filled(self, first: int, out: FillOutcome) -> None:
        """A write-protected COPY from the file settled ``out.done`` pages at ``first``: they
        are clean. Not when some page of them already existed: which one is not known, and an
        existing page is someone else's content."""
        if out.existed == 0 and out.done:
            self.bits.set_range(first, first + out.done)

    def forget(self, start: int, end: int) -> None:
        self.bits.clear_range(start, end)

    def forget_all(self, why: str = "") -> None:
        if why and self.bits.any():
            _log.info("forgetting %d clean pages: %s", self.bits.count(), why)
        self.bits.clear_range(0, self.num_pages)

    @property
    def count(self) -> int:
        return self.bits.count()

    def take(self, written: npt.NDArray[np.bool_] | None) -> npt.NDArray[np.int64]:
        """The clean pages no process wrote (ascending indexes); every bit is cleared, since
        after this enable each page is either current in the file or moved (``written``
        None: the scan failed, every page counts as written)."""
        n = self.num_pages
        if written is not None and (written.shape != (n,) or written.dtype != np.bool_):
            raise ValueError(f"written must have one bool slot per page ({n}), got "
                             f"{written.dtype} {written.shape}")
        kept = self.bits.bools(0, n)
        self.forget_all()
        if written is None:
            self.dirty_pages = int(np.count_nonzero(kept))
            return np.zeros(0, dtype=np.int64)
        clean = kept & ~written
        self.dirty_pages = int(np.count_nonzero(kept)) - int(np.count_nonzero(clean))
        return np.flatnonzero(clean).astype(np.int64)

    # --- enable ---------------------------------------------------------------------------------
    def release(self, written: npt.NDArray[np.bool_] | None) -> npt.NDArray[np.bool_] | None:
        """Clean pages no process wrote become file pages again, without a copy.

        ``written`` (one slot per page) is the union of every mapping process's scan; None
        means it could not be had, and every page counts as written. A clean page must still
        be resident: a hole there means the VMM punched it itself, and its slot is stale. (On
        hugetlbfs, where SEEK_DATA cannot tell, the move reads each released page and takes
        one that reads as zeros out of the file again: a hole and a page of zeros both read
        back as zeros.)
        Returns the released pages as one bool slot per page (None: none), for the move to
        staging to punch without copying them (``move_to_staging(skip=...)``).

        **Safety**: every process mapping guest memory is frozen (as for the move to staging)
        until they are punched, and the slots become current *before* guest memory is
        punched, so a death in between leaves the page in both places (identical; guest
        memory wins everywhere, since a COPY never overwrites) and never in neither.
        """
        pages = self.take(written)
        if pages.size:
            pages = pages[self._resident(pages)]
        self.released_pages = int(pages.size)
        self.released_total_pages += int(pages.size)
        if not pages.size:
            return None
        self.swap_file.mark_current(pages)
        crash_point("release.current")
        released = np.zeros(self.num_pages, dtype=np.bool_)
        released[pages] = True
        return released

    def _resident(self, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which of ``pages`` (ascending) hold data in their memfd (SEEK_DATA; every page on
        hugetlbfs, where the move checks instead)."""
        if self.page_size != PAGE_SIZE:
            return np.ones(pages.size, dtype=np.bool_)
        resident = np.zeros(pages.size, dtype=np.bool_)
        for region in self.regions:
            lo, hi = (int(i) for i in np.searchsorted(pages, [region.base_page,
                                                                region.end_page]))
            if lo == hi:
                continue
            offsets = (pages[lo:hi] - region.base_page) * self.page_size
            for start, end in data_ranges(region.memfd, region.size):
                a, b = (int(i) for i in np.searchsorted(offsets, [start, end]))
                resident[lo + a:lo + b] = True
        return resident

    # --- the file's size ------------------------------------------------------------------------
    def limit(self, max_bytes: int) -> int:
        """Keep at most ``max_bytes`` of file for clean pages: pages whose slot lies beyond
        lose it and the file is cut there. Only while nothing is current in the file (after a
        swap-in). Returns the pages that lost their slot."""
        if self.swap_file.current_pages:
            raise ValueError("limit: pages still live in the swap file")
        keep = max(0, max_bytes) // self.page_size
        slots = self.swap_file.slots_of(0, self.num_pages)
        beyond = np.flatnonzero(slots >= keep)
        freed = self.swap_file.free_pages(beyond)
        self.bits.set_indices(beyond, False)
        self.swap_file.cut(keep)
        return freed

    def stats(self) -> TrackingStats:
        return TrackingStats(TrackingMode.WP_ASYNC, self.count, self.dirty_pages,
                             self.released_pages, self.released_total_pages)
