"""Staging memory: one memfd that holds guest pages between ``enable`` and ``out``.

A memfd rather than anonymous memory so the pages count as shmem, as crosvm does (commit
37f8a7da5), and so every transfer is file I/O: pages come in from the guest memfd with
``copy_file_range`` (kernel to kernel, no page table of this process involved), leave with
``preadv`` into a buffer the handler already populated, and are freed with a hole punch.
Faults never map staging pages one by one, so serving one never pays a page-table update per
staging page -- the dominant cost of memory operations on nested-virtualisation hosts like the
CI machine (the one mapping below is populated before the freeze, in bulk).

**The one mapping** (:meth:`StagingMemory.populate`, :meth:`StagingMemory.view`): an enable
allocates and maps the staging pages it is about to fill *before* the VMM is frozen
(MADV_POPULATE_WRITE on a MAP_SHARED mapping of the memfd), and the frozen move then reads
guest memory straight into them (``preadv``: a page-cache copy at memcpy speed, against
``copy_file_range``'s splice into pages the kernel must allocate and zero inside the freeze).
Swap-out writes the file straight from the same mapping (no bounce copy), faults and swap-in
COPY from it (:meth:`StagingMemory.map_pages`), and trim checks pages in place. Only present pages
and pages about to be filled are ever touched through it, so it never allocates a page
nobody asked for except those :meth:`populate` allocates on purpose, which hold zeros, have
their bits clear, and are freed again like any other leftover (:meth:`sweep_leftovers`).

Which pages staging holds is a bitmap (:class:`~vmmswap.dataplane.present_list.PresentList`); pages
are
indexed like the swap file's, all regions back to back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final

import numpy as np

from vmmswap.dataplane.guest_memory import data_ranges
from vmmswap.dataplane.page_state import PageState, PageStateError
from vmmswap.dataplane.present_list import Indices, PresentList, runs_of
from vmmswap.kernel import libc
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE


def create_staging_memfd(page_size: int = PAGE_SIZE) -> int:
    """The staging memfd (MFD_CLOEXEC, empty: the page handler sizes it) that the VMM side
    creates at launch and keeps, so staged pages outlive a monitor.

    Staging is ordinary shmem whatever the guest's page (hugetlbfs guests too: a staged huge
    page is 2 MiB of it, written and read whole), so ``page_size`` only names it.
    """
    if page_size < PAGE_SIZE or page_size % PAGE_SIZE:
        raise ValueError(f"staging page size {page_size} is not a multiple of {PAGE_SIZE}")
    return os.memfd_create(f"vmmswap staging ({page_size // 1024} KiB pages)", os.MFD_CLOEXEC)

_log = logging.getLogger(__name__)

_PUNCH: Final = libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE
#: Bytes of freed staging collected before the reclaimer thread punches them: a fault that
#: reads one page does not pay a hole-punch system call, and a sequential page-in punches 2 MiB
#: at a time on the other CPU while the handler serves the next fault.
RECLAIM_BATCH_BYTES: Final = 2 * 1024 * 1024
#: ... and what swap-out collects (``clear_range(bulk=True)``): it frees staging 2 MiB at a
#: time, as fast as the file takes it, and a punch on the other CPU every 2 MiB slows the writes
#: down (the thread's wake-up and the GIL it takes back each time). Measured, 1 GiB to tmpfs,
#: six rounds each, out / raw pwrite: 0.57-0.81 with 2 MiB batches, 0.64-0.92 with 16 MiB,
#: 0.88-0.90 with 64 MiB. The price is at most 64 MiB of staging freed ~20 ms later. A
#: swap-out that ends submits what it left (:meth:`StagingMemory.submit_freed`).
RECLAIM_BULK_BATCH_BYTES: Final = 64 * 1024 * 1024
#: Nice value of the reclaimer thread (Linux sets it per thread).
_RECLAIM_NICE: Final = 10
#: The reclaimer waits until the handler has served no fault for this long: freeing pages
#: while the handler allocates guest pages slows a page-in by a third (zone lock contention
#: and a CPU taken from the fill threads), and a burst of faults is over in milliseconds.
_QUIET_S: Final = 0.003
#: ... but never longer than this, nor with more than this many bytes waiting.
_MAX_DEFER_S: Final = 1.0
_MAX_BACKLOG_BYTES: Final = 1 << 30


class _Reclaimer:
    """Punches holes in staging on a helper thread, in batches.

    The bitmap is updated by the caller at once; only the memory is given back later. That is
    safe because nothing writes a staging page that is not present except the move to staging,
    which :meth:`flush` es first: a pending punch can never hit newly staged data.
    """

    def __init__(self, fd: int, page_size: int) -> None:
        self._fd = fd
        self._page_size = page_size
        self._batch_pages = max(1, RECLAIM_BATCH_BYTES // page_size)
        self._bulk_batch_pages = max(1, RECLAIM_BULK_BATCH_BYTES // page_size)
        self._max_backlog = max(1, _MAX_BACKLOG_BYTES // page_size)
        self._pending: list[tuple[int, int]] = []
        self._pending_pages = 0
        self._batches: list[list[tuple[int, int]] | Callable[[], list[tuple[int, int]]]] = []
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._urgent = False
        self._backlog = 0
        #: time.monotonic() until which the handler counts as busy (set without the lock: a
        #: float store is atomic, and a stale value only shifts a punch by milliseconds).
        self.busy_until = 0.0
        self._thread: threading.Thread | None = None

    def add(self, start: int, end: int, bulk: bool = False) -> None:
        if self._pending and self._pending[-1][1] == start:
            self._pending[-1] = (self._pending[-1][0], end)
        elif self._pending and self._pending[-1][0] == end:
            self._pending[-1] = (start, self._pending[-1][1])
        else:
            self._pending.append((start, end))
        self._pending_pages += end - start
        if self._pending_pages >= (self._bulk_batch_pages if bulk else self._batch_pages):
            self._submit()

    def submit(self) -> None:
        """Hand what is collected to the thread now, whatever its size."""
        self._submit()

    def _submit(self) -> None:
        if not self._pending:
            return
        batch, self._pending, self._pending_pages = self._pending, [], 0
        with self._cond:
            self._batches.append(batch)
            self._backlog += sum(end - start for start, end in batch)
            self._cond.notify()
        self._start()

    def add_sweep(self, find: Callable[[], list[tuple[int, int]]]) -> None:
        """Punch, on the helper thread, the ranges ``find`` returns when their turn comes."""
        with self._cond:
            self._batches.append(find)
            self._cond.notify()
        self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vmmswap-staging-reclaim",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # Freeing memory is never urgent: let the threads that fill guest pages go first.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _RECLAIM_NICE)
        while True:
            with self._cond:
                while not self._batches and not self._stop:
                    self._cond.wait()
                if not self._batches:
                    return
                self._wait_quiet()
                job = self._batches.pop(0)
                if not callable(job):
                    self._backlog -= sum(end - start for start, end in job)
                self._busy = True
            try:
                batch = job() if callable(job) else job
            except (OSError, ValueError) as err:
                _log.warning("finding leaked staging pages: %s", err)
                batch = []
            for start, end in batch:
                try:
                    libc.fallocate(self._fd, _PUNCH, start * self._page_size,
                                   (end - start) * self._page_size)
                except OSError as err:  # only memory is at stake, never data
                    _log.warning("freeing staging pages [%d, %d): %s", start, end, err)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _wait_quiet(self) -> None:
        """Hold back (lock held) while the handler is busy serving faults."""
        deadline = time.monotonic() + _MAX_DEFER_S
        while not self._urgent and not self._stop and self._backlog < self._max_backlog:
            now = time.monotonic()
            wake = min(self.busy_until, deadline)
            if now >= wake:
                return
            self._cond.wait(wake - now)

    def flush(self) -> None:
        """Return once every punch requested so far is done."""
        self._submit()
        with self._cond:
            self._urgent = True
            self._cond.notify_all()
            while self._batches or self._busy:
                self._cond.wait()
            self._urgent = False

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _keep_mapped() -> None:
    """A COPY from the staging mapping has nothing to unmap afterwards."""


class StagingMemory:
    """A memfd of ``num_pages`` pages and the bitmap of pages it holds.

    ``page_size`` is the guest's page (2 MiB for hugetlbfs guest memory): one bit and one slot
    of the memfd per guest page, so a huge page is staged, read and freed whole. The memfd
    itself is ordinary shmem whatever the guest's page.
    """

    def __init__(self, num_pages: int, name: str = "swap staging memory", *,
                 page_size: int = PAGE_SIZE) -> None:
        if num_pages <= 0:
            raise ValueError(f"staging memory needs at least one page, got {num_pages}")
        if page_size < PAGE_SIZE or page_size % PAGE_SIZE:
            raise ValueError(f"staging page size {page_size} is not a multiple of {PAGE_SIZE}")
        self.page_size = page_size
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self._owns_fd = True
        try:
            os.ftruncate(self._fd, num_pages * page_size)
        except BaseException:
            os.close(self._fd)
            raise
        self.present = PresentList(num_pages)
        self._reclaimer = _Reclaimer(self._fd, page_size)
        self._map: Mapping | None = None
        self._view: memoryview | None = None

    @classmethod
    def over(cls, fd: int, state: PageState, *, fresh: bool,
             owns_fd: bool = False) -> StagingMemory:
        """Staging in the caller's memfd ``fd`` (see :func:`create_staging_memfd`), its bitmap
        in ``state``. The descriptor stays the caller's (the VMM keeps it for a successor).

        ``fresh``: every page is dropped (the memfd is emptied and sized for the state).
        Otherwise this is a successor's view: the memfd must already have the state's size,
        and pages it holds that the bitmap does not are a dead handler's leftovers (a punch
        it had deferred, a copy it had not marked yet): they are freed in the background.
        """
        self = cls.__new__(cls)
        self.page_size = state.page_size
        size = state.num_pages * state.page_size
        if fresh:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:
            raise PageStateError(f"staging memfd {fd} holds {os.fstat(fd).st_size} bytes, the "
                                 f"page state needs {size}: not this state's staging")
        self._fd = fd
        self._owns_fd = owns_fd
        self.present = PresentList.over(state.staging_present, state.num_pages)
        self._reclaimer = _Reclaimer(fd, state.page_size)
        self._map = None
        self._view = None
        if not fresh:
            self._reclaimer.add_sweep(self._leaked_ranges)
        return self

    def _leaked_ranges(self) -> list[tuple[int, int]]:
        """Page ranges that hold data in the memfd but are not present (runs on the
        reclaimer thread: only moves set bits, and a move flushes the reclaimer first)."""
        ps = self.page_size
        out: list[tuple[int, int]] = []
        for start, end in data_ranges(self._fd, self.num_pages * ps):
            first, last = start // ps, (end + ps - 1) // ps
            bits = self.present.bools(first, last)
            absent = np.flatnonzero(~bits).astype(np.int64) + first
            out.extend(runs_of(absent))
        return out

    # --- descriptor -----------------------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("staging memory is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the memfd (the kernel frees every staged page). Idempotent."""
        if self._fd >= 0:
            self._reclaimer.close()
            self._unmap()
            fd, self._fd = self._fd, -1
            if self._owns_fd:
                os.close(fd)

    def __enter__(self) -> StagingMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def num_pages(self) -> int:
        return len(self.present)

    @property
    def pages(self) -> int:
        """Pages staging holds."""
        return self.present.count()

    @property
    def nbytes(self) -> int:
        """Bytes of page state."""
        return self.present.nbytes

    # --- the mapping -----------------------------------------------------------------------------
    @property
    def mapped(self) -> bool:
        return self._view is not None

    def view(self) -> memoryview:
        """The whole memfd as bytes of this process, mapped MAP_SHARED on first use.

        **Safety**: touch only present pages, or pages about to be written whole: reading a
        hole through the mapping allocates a page. Only system calls (``preadv`` into it,
        ``pwritev`` from it) should touch it, with the GIL released; it is never registered
        with userfaultfd, so those calls never fault into the handler.
        """
        if self._view is None:
            length = self.num_pages * self.page_size
            self._map = Mapping.map_fd(self.fileno(), length)
            self._view = memoryview(self._map.as_ctypes()).cast("B")
        return self._view

    def page_view(self, start: int, end: int) -> memoryview:
        """Pages ``[start, end)`` of :meth:`view`."""
        self.present.check_range(start, max(end, start + 1))
        return self.view()[start * self.page_size:end * self.page_size]

    def unmap(self) -> None:
        """Drop the mapping (until the next :meth:`populate`): moves copy with
        ``copy_file_range`` and swap-out reads through a buffer again, as with a staging
        nobody prepared (the benchmark compares both)."""
        self._unmap()

    def _unmap(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def populate(self, start: int, end: int) -> None:
        """Allocate and map pages ``[start, end)`` now (zeros where the memfd has a hole, data
        kept where it has data), so a later write into them costs neither an allocation nor a
        page fault. Their bits are not touched: until a move fills and marks them they are
        leftovers, which :meth:`sweep_leftovers` (or a successor's sweep) frees.
        """
        if end <= start:
            return
        self.present.check_range(start, end)
        self.view()
        assert self._map is not None
        self._map.madvise(libc.MADV_POPULATE_WRITE, start * self.page_size,
                          (end - start) * self.page_size)

    def sweep_leftovers(self) -> None:
        """Free, on the reclaimer thread, every page the memfd holds whose bit is clear
        (pages :meth:`populate` allocated that no move filled)."""
        self._reclaimer.add_sweep(self._leaked_ranges)

    # --- data -----------------------------------------------------------------------------------
    def copy_in(self, src_fd: int, src_offset: int, page: int, length: int) -> None:
        """Copy ``length`` bytes of ``src_fd`` at ``src_offset`` to staging page ``page``.

        The bitmap is not touched: the caller marks the pages present once the guest's copy is
        removed, so a failure in between leaves the page in the guest only.

        **Safety**: the source range must be data (SEEK_DATA) of a guest memfd whose users are
        frozen; a page written between this copy and the guest-side hole punch is lost. Call
        :meth:`flush` before the first copy: a pending punch would free the new data.
        """
        self.present.check_range(page, page + 1)
        dst = page * self.page_size
        if self._view is not None:
            # Mapped (the enable populated staging before the freeze): a page-cache read into
            # pages that already exist. A hole in the source would read as zeros without
            # allocating anything (the caller asks only for data extents anyway).
            self.present.check_range(page, page + max(1, length // self.page_size))
            view = self._view[dst:dst + length]
            done = 0
            while done < length:
                n = os.preadv(src_fd, [view[done:]], src_offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"copy to staging stopped at {src_offset + done:#x}: "
                                  "the guest memfd is shorter than its region")
                done += n
            return
        done = 0
        while done < length:
            n = os.copy_file_range(src_fd, self._fd, length - done, src_offset + done, dst + done)
            if n <= 0:
                raise OSError(errno.EIO, f"copy to staging stopped at {src_offset + done:#x}: the "
                              "guest memfd is shorter than its region")
            done += n

    def write(self, page: int, data: memoryview) -> None:
        """Write whole pages from ``data`` (this process's memory) at staging page ``page``.

        For guest memory that ``copy_file_range`` cannot read (hugetlbfs: no splice, EXDEV).
        As with :meth:`copy_in`, the bitmap is the caller's to update.
        """
        pages = data.nbytes // self.page_size
        self.present.check_range(page, page + pages)
        offset = page * self.page_size
        done = 0
        while done < data.nbytes:
            n = os.pwrite(self._fd, data[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"staging write at {offset + done:#x} wrote nothing")
            done += n

    def map_pages(self, start: int, end: int) -> tuple[int, Callable[[], None]] | None:
        """Where present pages ``[start, end)`` can be COPYed from in place: their address in
        the one mapping, or None while staging is not mapped (the caller reads them into a
        buffer instead). The mapping outlives the COPY, so there is nothing to release.

        Why: a page-in through a buffer copies every byte twice (``preadv``, then the COPY);
        from the mapping the COPY is the only copy. The pages the move filled through the
        mapping are already in this process's page table, so the COPY takes no fault on them.

        **Safety**: every page of the range must be present (the handler asks only for runs
        of the bitmap): a hole read through the mapping would allocate a zero page and serve
        it. The mapping is this process's own and never registered with userfaultfd.
        """
        if self._map is None:
            return None
        self.present.check_range(start, max(end, start + 1))
        return self._map.address + start * self.page_size, _keep_mapped

    def read(self, start: int, end: int, buf: memoryview) -> None:
        """Read pages ``[start, end)`` into ``buf`` (which must be populated, own memory)."""
        self.present.check_range(start, end)
        offset = start * self.page_size
        total = (end - start) * self.page_size
        done = 0
        while done < total:
            got = os.preadv(self._fd, [buf[done:total]], offset + done)
            if got <= 0:
                raise OSError(errno.EIO, f"staging read at {offset + done:#x} returned nothing")
            done += got

    def read_runs(self, runs: list[tuple[int, int]], buf: memoryview) -> None:
        """Read each ``(first, end)`` run into ``buf``, back to back."""
        at = 0
        for first, end in runs:
            n = (end - first) * self.page_size
            self.read(first, end, buf[at:at + n])
            at += n

    # --- state ----------------------------------------------------------------------------------
    def mark_present(self, start: int, end: int) -> None:
        self.present.set_range(start, end)

    def clear_range(self, start: int, end: int, *, bulk: bool = False) -> None:
        """Forget ``[start, end)``; its memory is freed soon after (see :meth:`flush`).
        ``bulk``: a swap-out's, collected in larger batches (see RECLAIM_BULK_BATCH_BYTES)."""
        self.present.clear_range(start, end)
        if end > start:
            self._reclaimer.add(start, end, bulk)

    def submit_freed(self) -> None:
        """Start freeing every page forgotten so far (a swap-out is done: nothing more is
        coming to fill its batch)."""
        self._reclaimer.submit()

    def clear_pages(self, pages: Indices) -> None:
        """Forget the given pages (ascending); their memory is freed soon after."""
        self.present.set_indices(pages, False)
        for first, end in runs_of(pages):
            self._reclaimer.add(first, end)

    def note_busy(self) -> None:
        """The handler is serving a fault: hold freeing back for a few milliseconds."""
        self._reclaimer.busy_until = time.monotonic() + _QUIET_S

    def flush(self) -> None:
        """Wait until the memory of every page cleared so far is freed.

        Must run before anything writes into staging again (the move to staging does).
        """
        self._reclaimer.flush()

    def punch(self, start: int, end: int) -> None:
        """Free the memory of ``[start, end)`` now, without touching the bitmap."""
        if end > start:
            libc.fallocate(self._fd, _PUNCH, start * self.page_size, (end - start) * self.page_size)

    def __repr__(self) -> str:
        return f"<StagingMemory fd={self._fd} pages={self.num_pages}>"
