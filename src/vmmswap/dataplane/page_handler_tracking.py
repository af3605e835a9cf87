"""The page handler's side of dirty tracking: which pages are clean, and releasing them.

A mixin of :class:`~vmmswap.dataplane.page_handler.PageHandler`; the rules are in
:mod:`vmmswap.dataplane.dirty` and :mod:`vmmswap.dataplane.kept_file`. The handler only
records fills from the file through a write-protecting uffd and hands the clean set over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.dirty import TrackingStats
from vmmswap.dataplane.page_fill import FillOutcome, fills_protected

if TYPE_CHECKING:
    from vmmswap.dataplane.kept_file import KeptFile
    from vmmswap.uffd.userfaultfd import Userfaultfd

__all__ = ["DirtyTrackingHandling"]


class DirtyTrackingHandling:
    """Mixin of the page handler: the clean pages of the kept file."""

    clean: KeptFile | None
    _released: npt.NDArray[np.bool_] | None

    def check_open(self) -> None:
        raise NotImplementedError

    def note_file_filled(self, uffd: Userfaultfd, first: int, out: FillOutcome) -> None:
        """A fill from the file through ``uffd`` settled ``out.done`` pages at ``first``:
        clean, if the fill was write-protected."""
        if self.clean is not None and fills_protected(uffd):
            self.clean.note_filled(first, out)

    def release_clean(self, written: npt.NDArray[np.bool_] | None) -> int:
        """Clean pages no process wrote become file pages again, without a copy (see
        :meth:`KeptFile.release <vmmswap.dataplane.kept_file.KeptFile.release>`); the next
        :meth:`move_to_staging` punches them with the rest. Returns how many."""
        self.check_open()
        if self.clean is None:
            return 0
        self._released = self.clean.release(written)
        return self.clean.released_pages

    def forget_clean(self, why: str) -> None:
        """Trust no clean page any more (a device process left: its writes are unknown)."""
        if self.clean is not None:
            self.clean.forget_all(why)

    def limit_kept(self, max_bytes: int) -> int:
        """Keep at most ``max_bytes`` of file for clean pages (after a swap-in)."""
        self.check_open()
        return 0 if self.clean is None else self.clean.limit(max_bytes)

    def tracking_stats(self) -> TrackingStats:
        return TrackingStats() if self.clean is None else self.clean.stats()
