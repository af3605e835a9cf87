"""Swap-in: bring every staged and swapped page back into guest memory (``disable``).

Staging first (it is memory: fast, and frees memory), then the swap file in page order. Each
call moves up to ``max_bytes`` and returns, so the monitor serves faults in between; the cursors
make it resumable, and the monitor aborts by simply not calling again (then :meth:`close`).

Pages are filled with UFFDIO_COPY in DONTWAKE mode: nobody is waiting for them. A thread that
is waiting for one has a fault event queued; when the monitor serves it the page is found in no
source, ZEROPAGE answers EEXIST, and the handler wakes the thread (a redundant fault). A step
gathers up to 64 runs (fragmented memory still moves a whole chunk per call) and fills them on
two threads (:meth:`~vmmswap.dataplane.page_fill.RunFiller.fill_runs`). Pages that already exist are
skipped (the guest's copy wins). A COPY refused as a whole (ENOENT: the run crosses a VMA
boundary of the VMM's mapping, e.g. after an ``madvise`` split it) is retried in ever shorter
pieces, where crosvm's 2 MiB chunk would fail the swap-in.

**Prefetch.** Before copying from the file, the next ``prefetch_bytes`` of swapped pages (16 MiB
by default, crosvm's MLOCK_BUDGET) are handed to ``posix_fadvise(WILLNEED)``, so the disk reads
ahead of the copy. crosvm also mlocks that window through a mapping of the file; this handler
reads the file with ``preadv`` and maps nothing, so there is nothing to lock: a prefetched page
reclaimed before use is simply read again. ``close`` therefore only ends the context.
After a run is copied its page cache is dropped (the data now lives in the guest); the disk copy
and the slot stay, so a later trim can still find clean pages, and with dirty tracking the
next enable releases the pages nobody wrote without copying them (:mod:`.dirty`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from vmmswap.dataplane.crash_points import crash_point
from vmmswap.dataplane.page_fill import FillOutcome, MapFn, ReadFn, settled_block
from vmmswap.dataplane.page_store import PageStore
from vmmswap.dataplane.present_list import PresentList
from vmmswap.uffd.errors import MappingChangingError, ProcessGoneError
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd

DEFAULT_PREFETCH_BYTES: Final = 16 * 1024 * 1024
MAX_SWAP_IN_BYTES: Final = 2 * 1024 * 1024
#: ``filled(first, outcome)``: a part of a run settled (see PageStore.note_file_filled).
FilledFn = Callable[[int, FillOutcome], None]
#: Runs gathered into one step: fragmented memory still moves a chunk per step.
_MAX_RUNS_PER_STEP: Final = 64


class SwapInContext:
    """A resumable swap-in; see the module docstring."""

    def __init__(self, handler: PageStore,
                 prefetch_bytes: int = DEFAULT_PREFETCH_BYTES) -> None:
        self._handler = handler
        self._epoch = handler.epoch
        self._page_size = handler.page_size
        self._prefetch_pages = prefetch_bytes // self._page_size
        self._staging_cursor = 0
        self._file_cursor = 0
        self._prefetch_cursor = 0
        self._prefetched = 0  # swapped pages advised but not yet copied
        self._closed = False
        #: Pages brought back (or found already present) so far.
        self.pages = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End the swap-in (abort, or after it finished). Idempotent."""
        self._closed = True

    def __enter__(self) -> SwapInContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def swap_in(self, uffd: Userfaultfd, max_bytes: int = MAX_SWAP_IN_BYTES) -> int:
        """Bring back up to ``max_bytes`` of pages through ``uffd``; returns pages, 0 = done.

        ``uffd`` is any uffd that has every region registered (the VMM's own): guest memory is
        shared, so a page filled through it is there for every process.

        Raises MappingChangingError when the address space is changing and nothing could be
        done in this call (read that uffd's events, handle REMOVE, call again),
        ProcessGoneError when its process is dead, and OSError when the swap file cannot be
        read. Pages already settled are accounted first; the cursors never skip a page that was
        not filled.
        """
        if self._closed:
            raise ValueError("the swap-in context is closed")
        handler = self._handler
        handler.check_open()
        if handler.epoch != self._epoch:
            # A new enable staged pages behind the cursors: start over.
            self._epoch = handler.epoch
            self._staging_cursor = self._file_cursor = self._prefetch_cursor = 0
            self._prefetched = 0
        if max_bytes < PAGE_SIZE:
            raise ValueError(f"swap_in needs at least one page, got max_bytes={max_bytes}")
        # At least one guest page: a 2 MiB hugetlbfs page is only ever filled whole.
        budget = max(1, min(max_bytes // self._page_size, handler.bounce.pages))
        # A bulk fill is running: the staging memory it frees is given back once it pauses.
        handler.staging.note_busy()
        done = 0
        while done < budget:
            try:
                n = self._staging_step(uffd, budget - done)
                if n == 0:
                    n = self._file_step(uffd, budget - done)
            except OSError:
                if done:
                    break  # report progress; the next call meets the error again
                raise
            if n == 0:
                break
            done += n
        self.pages += done
        handler.note_swapped_in(done)
        return done

    def _staging_step(self, uffd: Userfaultfd, max_pages: int) -> int:
        staging = self._handler.staging
        n, self._staging_cursor = self._copy_next_runs(
            uffd, staging.present, self._staging_cursor, max_pages, staging.read,
            staging.clear_range, staging.map_pages)
        return n

    def _file_step(self, uffd: Userfaultfd, max_pages: int) -> int:
        swap_file = self._handler.swap_file
        self._prefetch()

        def settle(first: int, end: int) -> None:
            swap_file.clear_current(first, end)
            swap_file.drop_cache(first, end)
            if first < self._prefetch_cursor:
                self._prefetched = max(0, self._prefetched - (min(end, self._prefetch_cursor)
                                                              - first))

        n, self._file_cursor = self._copy_next_runs(
            uffd, swap_file.current, self._file_cursor, max_pages, swap_file.read_pages, settle,
            self._handler.file_mapper,
            lambda first, out: self._handler.note_file_filled(uffd, first, out))
        return n

    def _copy_next_runs(self, uffd: Userfaultfd, present: PresentList, cursor: int,
                        max_pages: int, read: ReadFn, settle: Callable[[int, int], None],
                        mapper: MapFn | None = None,
                        filled: FilledFn | None = None) -> tuple[int, int]:
        """Copy the next runs of ``present`` (up to ``max_pages`` pages) at or after ``cursor``;
        returns (pages settled, new cursor). ``filled`` hears of every part settled (dirty
        tracking: pages from the file are clean)."""
        handler = self._handler
        runs: list[tuple[int, int, int]] = []
        pos, budget = cursor, max_pages
        while budget > 0 and len(runs) < _MAX_RUNS_PER_STEP:
            run = present.first_run(pos, None, budget)
            if run is None:
                break
            first, end = run
            region = handler.region_of_page(first)
            end = min(end, region.end_page)  # one COPY never crosses a region
            runs.append((region.addr_of(first), first, end - first))
            budget -= end - first
            pos = end
        if not runs:
            return 0, len(present)
        results = handler.filler.fill_runs(uffd, runs, read, wake=False, mapper=mapper)
        done = 0
        new_cursor = -1
        errors: list[OSError] = []
        crash_point("swapin.filled")
        for (_dst, first, count), parts in zip(runs, results, strict=True):
            for part in parts:
                if part.out.done:
                    settle(first + part.offset, first + part.offset + part.out.done)
                    if filled is not None:
                        filled(first + part.offset, part.out)
                    done += part.out.done
                if part.out.error is not None:
                    errors.append(part.out.error)
            if new_cursor < 0:
                # The cursor stops at the first page not settled; pages settled past it have
                # left their source, so the next scan skips them.
                _lo, hi = settled_block(parts, 0)
                if hi < count:
                    new_cursor = first + hi
        if errors and done == 0:
            dst, first, count = runs[0]
            if count > 1 and not isinstance(errors[0], MappingChangingError | ProcessGoneError):
                # The run may cross a VMA boundary of the VMM's mapping (a COPY must stay in
                # one VMA): try ever shorter pieces of it.
                n = self._shrinking_fill(uffd, dst, first, count // 2, read, settle, mapper,
                                         filled)
                return n, first + n
            raise errors[0]
        return done, (pos if new_cursor < 0 else new_cursor)

    def _shrinking_fill(self, uffd: Userfaultfd, dst: int, first: int, count: int,
                        read: ReadFn, settle: Callable[[int, int], None],
                        mapper: MapFn | None = None, filled: FilledFn | None = None) -> int:
        """Fill the first ``count`` pages of a run, halving ``count`` while the kernel refuses;
        returns the pages settled (raises when even one page fails)."""
        while True:
            parts = self._handler.filler.fill(uffd, dst, first, count, read, wake=False,
                                              mapper=mapper)
            _lo, hi = settled_block(parts, 0)
            for part in parts:
                if part.out.done:
                    settle(first + part.offset, first + part.offset + part.out.done)
                    if filled is not None:
                        filled(first + part.offset, part.out)
            if hi:
                return hi
            error = next(p.out.error for p in parts if p.out.error is not None)
            if count == 1 or isinstance(error, MappingChangingError | ProcessGoneError):
                raise error
            count //= 2

    def _prefetch(self) -> None:
        """Keep about ``prefetch_bytes`` of swapped pages advised ahead of the copy cursor."""
        if self._prefetch_pages <= 0:
            return
        current = self._handler.swap_file.current
        if self._prefetch_cursor < self._file_cursor:
            self._prefetch_cursor, self._prefetched = self._file_cursor, 0
        if self._prefetched * 2 > self._prefetch_pages:
            return
        want = self._prefetch_pages - self._prefetched
        pages, cursor = current.collect(self._prefetch_cursor, None, want)
        swap_file = self._handler.swap_file
        if pages.size:
            swap_file.prefetch(pages)
        self._prefetched += int(pages.size)
        self._prefetch_cursor = cursor
