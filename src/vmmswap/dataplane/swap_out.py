"""Swap-out: writing staging to the swap file, one chunk per call, with the next chunk read ahead.

Each chunk is read from staging into a private buffer (``preadv``) and written to the file
(``pwrite``); the file copy is committed before staging lets the pages go, so a failed write
(ENOSPC, EIO) loses nothing. Reading the chunk costs about half as much as writing it, and the
two are serialised in a naive loop. Here, while a call writes chunk *k*, a helper thread already
reads chunk *k + 1* into a second buffer, and the next call starts writing at once.

The read-ahead copy is only used if it is still right when the next call comes, because the
monitor serves faults (and REMOVE events, and maybe a new ``enable``) in between:

* a page that left staging meanwhile (a fault served it, a REMOVE dropped it) is not written;
* a new move to staging (the handler's ``epoch`` changed) discards the whole copy, since a page
  that left staging and came back may hold new data.

A page present in staging never changes while it stays present (nothing writes a present
staging page), so those two checks are enough.

When staging is mapped (an enable prepared it, :mod:`vmmswap.dataplane.move_prepare`), a chunk
is instead written straight from the mapping with ``pwritev``: nothing is read into a buffer,
so there is nothing to read ahead either, and the file write is the whole cost.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import numpy as np

from vmmswap.dataplane.crash_points import crash_point
from vmmswap.dataplane.page_fill import Bounce
from vmmswap.dataplane.page_state import JOURNAL_CAPACITY, Journal, JournalOp
from vmmswap.dataplane.present_list import Indices, runs_of
from vmmswap.dataplane.staging import StagingMemory
from vmmswap.dataplane.swap_file import Gather, SwapFile
from vmmswap.uffd.pagesize import PAGE_SIZE

#: crosvm's MAX_SWAP_CHUNK_SIZE.
MAX_CHUNK_BYTES: Final = 2 * 1024 * 1024


@dataclass(slots=True)
class _ReadAhead:
    future: Future[None]
    pages: Indices
    buffer: int
    epoch: int


class SwapOutWriter:
    """The resumable swap-out of one handler's staging."""

    def __init__(self, staging: StagingMemory, swap_file: SwapFile,
                 chunk_bytes: int = MAX_CHUNK_BYTES, *, read_ahead: bool = True,
                 journal: Journal | None = None) -> None:
        self._staging = staging
        self._journal = journal
        self._file = swap_file
        #: The guest's page: a chunk holds at least one (a 2 MiB hugetlbfs page is moved whole).
        self._page_size = staging.page_size
        self._chunk_bytes = max(chunk_bytes, self._page_size)
        if journal is not None:
            # One chunk is one journalled step.
            self._chunk_bytes = min(self._chunk_bytes,
                                    max(1, JOURNAL_CAPACITY) * self._page_size)
        self._read_ahead = read_ahead
        self._buffers: list[Bounce] = []
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: _ReadAhead | None = None
        self._cursor = 0

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for buf in self._buffers:
            buf.close()
        self._buffers.clear()

    def reset(self) -> None:
        """Start the next scan from the first page (after a move to staging)."""
        self._drop_ahead()
        self._cursor = 0

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            with contextlib.suppress(OSError):  # it was only a read ahead
                self._ahead.future.result()
            self._ahead = None

    def _buffer(self, index: int) -> Bounce:
        while len(self._buffers) <= index:
            self._buffers.append(Bounce(self._chunk_bytes, self._page_size))
        return self._buffers[index]

    def _read(self, pages: Indices, buffer: int) -> None:
        self._staging.read_runs(runs_of(pages), self._buffer(buffer).view)

    def _take_ahead(self, epoch: int, max_pages: int) -> tuple[Indices, int] | None:
        """The pages read ahead that are still staged, compacted in their buffer; or None."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        try:
            ahead.future.result()
        except OSError:
            return None
        if ahead.epoch != epoch or ahead.pages.size > max_pages:
            self._cursor = 0
            return None
        mask = self._staging.present.test(ahead.pages)
        if not mask.all():
            rows = np.frombuffer(self._buffer(ahead.buffer).view, dtype=np.uint8).reshape(
                -1, self._page_size)
            keep = np.flatnonzero(mask)
            rows[:keep.size] = rows[keep]
            pages = ahead.pages[keep]
        else:
            pages = ahead.pages
        return (pages, ahead.buffer) if pages.size else None

    def step(self, max_bytes: int, epoch: int) -> int:
        """Write up to ``max_bytes`` of staging to the file; returns pages written, 0 = empty.

        At least one page is written when staging holds any, even if the guest's page is
        bigger than ``max_bytes`` (a huge page is never split). On OSError nothing is
        committed: every page is still in staging.
        """
        if max_bytes < PAGE_SIZE:
            raise ValueError(f"swap out needs at least one page, got max_bytes={max_bytes}")
        max_pages = max(1, min(max_bytes, self._chunk_bytes) // self._page_size)
        present = self._staging.present
        if self._staging.mapped:
            return self._step_direct(max_pages)
        taken = self._take_ahead(epoch, max_pages)
        if taken is not None:
            pages, buffer = taken
        else:
            pages = self._next_pages(max_pages)
            if pages.size == 0:
                return 0
            buffer = 0
            self._read(pages, buffer)
        # Read the next chunk while this one is written.
        if self._read_ahead:
            following, cursor = present.collect(self._cursor, None, max_pages)
            if following.size:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="vmmswap-out")
                other = 1 - buffer
                self._buffer(other)
                self._ahead = _ReadAhead(self._pool.submit(self._read, following, other),
                                         following, other, epoch)
                self._cursor = cursor
        nbytes = int(pages.size) * self._page_size
        return self._commit(pages, self._buffer(buffer).view[:nbytes])

    def _next_pages(self, max_pages: int) -> Indices:
        """Up to ``max_pages`` present staging pages from the cursor on, wrapping around once;
        empty (and the cursor back at 0) when staging holds none."""
        present = self._staging.present
        pages, self._cursor = present.collect(self._cursor, None, max_pages)
        if pages.size == 0 and self._cursor:
            pages, self._cursor = present.collect(0, None, max_pages)
        if pages.size == 0:
            self._cursor = 0
            self._staging.submit_freed()  # staging is empty: free the last batch now
        return pages

    def _step_direct(self, max_pages: int) -> int:
        """A chunk written straight from the staging mapping (``pwritev`` per run of slots):
        no bounce copy, no read-ahead thread. A page present now stays present and unchanged
        for the whole call (only this thread clears bits; nothing writes a present page)."""
        self._drop_ahead()
        pages = self._next_pages(max_pages)
        if pages.size == 0:
            return 0
        staging = self._staging
        runs = runs_of(pages)

        def gather(first: int, count: int) -> list[memoryview]:
            return [staging.page_view(a, b) for a, b in runs_of(pages[first:first + count])]

        return self._commit(pages, gather, runs)

    def _commit(self, pages: Indices, data: memoryview | Gather,
                runs: list[tuple[int, int]] | None = None) -> int:
        """Journal, write and commit ``pages``, then let staging go (see the module doc)."""
        journal = self._journal
        try:
            slots = self._file.plan_slots(pages)
            if journal is not None:
                journal.record(JournalOp.SWAP_OUT, pages, slots)
            crash_point("out.journaled")
            self._file.write_planned(pages, slots, data)
        except OSError:
            # Nothing committed. Forget the read-ahead and retry these pages next time.
            if journal is not None:
                journal.clear()
            self._drop_ahead()
            self._cursor = int(pages[0])
            raise
        crash_point("out.current")
        # The file holds them now; only then may staging let go.
        for first, end in runs_of(pages) if runs is None else runs:
            self._staging.clear_range(first, end, bulk=True)
        crash_point("out.cleared")
        if journal is not None:
            journal.clear()
        return int(pages.size)
