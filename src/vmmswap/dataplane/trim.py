"""Trim: drop staging pages that need no write (crosvm's ``TrimContext``).

Two kinds of staged page can leave staging without being written to the swap file:

* **zero pages** -- all bytes zero. The page is dropped from staging and its file slot (if any)
  freed; a later fault finds the page nowhere and gets a zero page.
* **clean pages** -- equal to the stale copy still in the page's file slot (a page that was
  swapped out, faulted back in and not written since). The file copy is marked current again
  and staging lets the page go.

The scan reads staged pages with ``preadv`` into a reused, cache-sized numpy buffer (up to
``max_pages`` pages per step). The zero check looks at the first 8 bytes of every page first
(one cache line per page, vectorised): a page whose first word is non-zero is not a zero page,
which settles almost every page with data. Only the rest get a full check. When staging is
mapped (an enable prepared it), the pages are checked in place through the mapping instead, so
a page with data costs one cache line, not a copy of the page.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.crash_points import crash_point
from vmmswap.dataplane.page_state import JOURNAL_CAPACITY, JournalOp
from vmmswap.dataplane.page_store import PageStore
from vmmswap.dataplane.present_list import consecutive_runs, runs_of
from vmmswap.uffd.pagesize import PAGE_SIZE

#: crosvm's MAX_TRIM_PAGES (of 4 KiB). With bigger guest pages (hugetlbfs) a step examines at
#: most the same number of bytes, so the monitor's fault latency between steps stays the same.
MAX_TRIM_PAGES: Final = 1024
_MAX_TRIM_BYTES: Final = MAX_TRIM_PAGES * PAGE_SIZE
#: Bytes read and checked at a time: the buffer (1 MiB) stays in the CPU cache between the
#: read and the check, which doubles the scan rate over reading a whole step at once.
_SCAN_BYTES: Final = 1024 * 1024

Pages = npt.NDArray[np.uint64]


def _page_buffer(old: Pages | None, pages: int, page_size: int) -> Pages:
    if old is not None and old.shape[0] >= pages and old.shape[1] * 8 == page_size:
        return old
    return np.empty((pages, page_size // 8), dtype=np.uint64)


def zero_page_mask(data: Pages) -> npt.NDArray[np.bool_]:
    """Which rows (pages) of ``data`` are all zero."""
    zero = np.zeros(data.shape[0], dtype=np.bool_)
    candidates = np.flatnonzero(data[:, 0] == 0)
    if candidates.size:
        zero[candidates] = ~data[candidates].any(axis=1)
    return zero


class TrimContext:
    """A resumable trim over staging; the monitor calls :meth:`trim_pages` between faults."""

    def __init__(self, handler: PageStore) -> None:
        self._handler = handler
        self._page_size = handler.page_size
        self._max_pages = max(1, _MAX_TRIM_BYTES // self._page_size)
        self._scan_pages = max(1, _SCAN_BYTES // self._page_size)
        self._cursor = 0
        self._epoch = handler.epoch
        self._done = False
        self._staged: Pages | None = None
        self._on_disk: Pages | None = None
        #: Pages dropped because they were all zero.
        self.zero_pages = 0
        #: Pages dropped because the swap file already held the same content.
        self.clean_pages = 0

    @property
    def trimmed_pages(self) -> int:
        return self.zero_pages + self.clean_pages

    def trim_pages(self, max_pages: int = MAX_TRIM_PAGES) -> int | None:
        """Examine up to ``max_pages`` staged pages; returns pages trimmed, or None when done.

        Faults may clear staged pages between calls: each call re-reads the bitmap. A new
        ``enable`` (move to staging) restarts the scan. Pages bigger than 4 KiB (hugetlbfs)
        are examined at most ``MAX_TRIM_PAGES * 4 KiB`` at a time, and at least one.
        """
        if max_pages < 1:
            raise ValueError(f"trim_pages needs max_pages >= 1, got {max_pages}")
        handler = self._handler
        handler.check_open()
        if handler.epoch != self._epoch:
            self._epoch, self._cursor, self._done = handler.epoch, 0, False
        if self._done:
            return None
        staging = handler.staging
        if self._page_size > PAGE_SIZE:
            max_pages = min(max_pages, self._max_pages)
        pages, cursor = staging.present.collect(self._cursor, None, max_pages)
        if pages.size == 0:
            self._done = True
            self._cursor = handler.num_pages
            return None
        zero = np.zeros(pages.size, dtype=np.bool_)
        clean = np.zeros(pages.size, dtype=np.bool_)
        # Slots past the end of the file (a file cleanup truncated it) are not trusted.
        file_slots = handler.swap_file.file_bytes() // self._page_size
        if staging.mapped:
            self._check_mapped(pages, zero, clean, file_slots)
        else:
            for at in range(0, int(pages.size), self._scan_pages):
                part = pages[at:at + self._scan_pages]
                count = int(part.size)
                self._staged = _page_buffer(self._staged, count, self._page_size)
                staged = self._staged[:count]
                staging.read_runs(runs_of(part), staged.data.cast("B"))
                zero[at:at + count] = zero_page_mask(staged)
                clean[at:at + count] = self._clean_mask(part, staged, zero[at:at + count],
                                                        file_slots)
        zero_pages = pages[zero]
        clean_pages = pages[clean]
        swap_file = handler.swap_file
        journal = handler.journal
        # Zero pages: nowhere is the right place for them; free any stale slot. The pages
        # with slots are journalled (a successor finishes the frees: a slot never stays used
        # with no page naming it), and staging lets go last: until then its zero copy counts.
        for at in range(0, int(zero_pages.size), JOURNAL_CAPACITY):
            part = zero_pages[at:at + JOURNAL_CAPACITY]
            slots = swap_file.slots_at(part)
            held = slots >= 0
            if journal is not None and held.any():
                journal.record(JournalOp.FREE_SLOTS, part[held], slots[held])
            crash_point("trim.journaled")
            swap_file.free_pages(part)
            crash_point("trim.freed")
            staging.clear_pages(part)
            crash_point("trim.zero_cleared")
            if journal is not None:
                journal.clear()
        # Clean pages: the file copy is current again before staging lets go (a crash in
        # between leaves two identical copies; staging is served first).
        swap_file.mark_current(clean_pages)
        crash_point("trim.marked_clean")
        staging.clear_pages(clean_pages)
        self._cursor = cursor
        self.zero_pages += int(zero_pages.size)
        self.clean_pages += int(clean_pages.size)
        return int(zero_pages.size + clean_pages.size)

    def _check_mapped(self, pages: npt.NDArray[np.int64], zero: npt.NDArray[np.bool_],
                      clean: npt.NDArray[np.bool_], file_slots: int) -> None:
        """The zero and clean checks of ``pages`` read in place through the staging mapping
        (an enable that prepared staging mapped it), run by run.

        Why: the zero check looks at one word of a page with data, so a scan that reads the
        pages whole first (``preadv`` into the buffer) costs a full copy of staging for a few
        bytes a page; in place it reads one cache line of each page.

        **Safety**: only present pages are read (``pages`` comes from the bitmap, and the
        bitmap cannot change under this single-threaded call), so no hole is read through the
        mapping (which would allocate a page); the mapping is never registered with
        userfaultfd, so reading it with the GIL held cannot fault into the handler.
        """
        staging = self._handler.staging
        words = self._page_size // 8
        at = 0
        for first, end in runs_of(pages):
            count = end - first
            rows = np.frombuffer(staging.page_view(first, end), dtype=np.uint64).reshape(
                count, words)
            run_zero = zero_page_mask(rows)
            zero[at:at + count] = run_zero
            clean[at:at + count] = self._clean_mask(pages[at:at + count], rows, run_zero,
                                                    file_slots)
            at += count

    def _clean_mask(self, pages: npt.NDArray[np.int64], staged: Pages,
                    zero: npt.NDArray[np.bool_], file_slots: int) -> npt.NDArray[np.bool_]:
        """Which of ``pages`` (staged content ``staged``) equal their copy in a slot below
        ``file_slots``, the file's length in slots (the caller's one fstat per step)."""
        swap_file = self._handler.swap_file
        clean = np.zeros(pages.size, dtype=np.bool_)
        slots = swap_file.slots_at(pages)
        check = np.flatnonzero(~zero & (slots >= 0) & (slots < file_slots))
        if check.size == 0:
            return clean
        self._on_disk = _page_buffer(self._on_disk, int(check.size), self._page_size)
        on_disk = self._on_disk[:check.size]
        view = on_disk.data.cast("B")
        wanted = slots[check]
        for row, count in consecutive_runs(wanted):
            # Rows whose slots are consecutive are read with one call.
            swap_file.read_slots(int(wanted[row]),
                                 view[row * self._page_size:(row + count) * self._page_size])
        same = (staged[check] == on_disk).all(axis=1)
        clean[check[same]] = True
        return clean
