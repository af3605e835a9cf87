"""The page handler's REMOVE events and its recovery: forgetting every copy of discarded pages.

A mixin of :class:`~vmmswap.dataplane.page_handler.PageHandler`, kept apart because dropping
copies is its own concept with its own crash rules: each drop is journalled, so a successor
monitor redoes one it finds recorded, and then applies the VMM's discard marks
(:mod:`vmmswap.dataplane.discard_log`) that no monitor applied.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vmmswap.dataplane import discard_log
from vmmswap.dataplane.crash_points import crash_point
from vmmswap.dataplane.page_state import Journal, JournalOp, PageState
from vmmswap.dataplane.page_store import InvalidAddressError, Region
from vmmswap.dataplane.recovery import finish_journal

if TYPE_CHECKING:
    from vmmswap.dataplane.kept_file import KeptFile
    from vmmswap.dataplane.staging import StagingMemory
    from vmmswap.dataplane.swap_file import SwapFile

__all__ = ["RemoveHandling"]

_log = logging.getLogger("vmmswap.dataplane.page_handler")


class RemoveHandling:
    """Mixin of the page handler: REMOVE events, and what a successor redoes of them."""

    page_size: int
    staging: StagingMemory
    swap_file: SwapFile
    clean: KeptFile | None
    state: PageState | None
    _journal: Journal | None

    def region_at(self, addr: int) -> Region:
        raise NotImplementedError

    def handle_remove(self, start: int, end: int) -> None:
        """The guest gave ``[start, end)`` (VMM addresses) back: forget its staged and swapped
        copies. Unaligned (to the guest's page: 2 MiB on hugetlbfs), reversed or out-of-region
        ranges raise InvalidAddressError and change nothing.

        **Safety** (a contract on the VMM): a REMOVE event means *discard*, as after
        MADV_REMOVE (the balloon's way on shared memory). The kernel sends the very same event
        for MADV_DONTNEED / MADV_FREE, which on a MAP_SHARED memfd only drop page-table entries
        and keep the data; nothing in the event tells them apart, and for a page that lives in
        staging or the swap file both leave the same hole. So while vmm-swap is enabled no
        process may MADV_DONTNEED or MADV_FREE guest memory: the staged or swapped copy would be
        dropped and the next access would read zeros (crosvm has the same rule implicitly).
        """
        ps = self.page_size
        if start % ps or end % ps or end < start:
            raise InvalidAddressError(f"the address is invalid: REMOVE [{start:#x}, {end:#x}) "
                                      f"is not a range of whole {ps // 1024} KiB pages")
        pieces: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            region = self.region_at(pos)
            stop = min(end, region.host_end)
            pieces.append((region.page_of(pos), region.page_of(stop - ps) + 1))
            pos = stop
        for first, last in pieces:
            self._drop_pages(first, last)

    def _drop_pages(self, first: int, last: int) -> None:
        """Forget every copy of pages ``[first, last)`` (a REMOVE), journalled: a successor
        redoes a drop it finds recorded, and then forgets the discard log's marks."""
        journal = self._journal
        if journal is not None:
            journal.record(JournalOp.REMOVE, start=first, end=last)
        crash_point("remove.journaled")
        self.swap_file.free_range(first, last)
        if self.clean is not None:
            self.clean.forget(first, last)
        crash_point("remove.file_freed")
        self.staging.clear_range(first, last)
        crash_point("remove.staging_cleared")
        if self.state is not None:
            discard_log.clear(self.state, first, last)
        if journal is not None:
            journal.clear()

    def recover(self) -> None:
        """Finish or undo the step the journal names, then apply announced discards.

        Called by :meth:`resume`; the journal's rules are in :mod:`.recovery`. Cost: the
        journal (at most JOURNAL_CAPACITY pages) and the discard log's written pages.
        """
        assert self.state is not None and self._journal is not None
        finish_journal(self._journal, self.swap_file, self.staging)
        pending = discard_log.pending_runs(self.state)
        for first, last in pending:
            self._drop_pages(first, last)
        if pending:
            _log.info("applied %d announced discards", len(pending))
