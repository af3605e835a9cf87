"""The swap file: a nameless, packed file of guest pages, with its page state in arrays.

Layout (crosvm's, made smaller):

* ``slots`` -- one ``uint32`` per guest page: 0 means the page has no file slot, otherwise
  ``slot + 1``. A page keeps its slot after it is paged back in, so a later trim can find that
  the staging copy equals the disk copy and skip the write (crosvm's "cleared" pages).
* ``current`` -- one *bit* per guest page: the slot holds the page's current content. crosvm
  keeps this bit in the MSB of the u32; a separate bitmap costs 1/32 more but lets swap-in and
  metrics scan 64 pages per word instead of testing every u32.
* ``used`` -- one bit per slot: the slot belongs to some page. crosvm keeps a u32 per slot (a
  reverse map plus a linked free list), which costs another 4 bytes per swapped page; a bitmap is
  enough to reuse free slots lowest-first, which keeps the file packed (commit 786a4deb6: a file
  with many holes makes deletion issue huge numbers of discards).

Total: 4.25 bytes per guest page, about 1.06 MiB per GiB (crosvm: 4 + 4 + 1 = 9 bytes).

The file is opened ``O_TMPFILE | O_EXCL`` with mode 0600 inside the swap directory: it has no name,
cannot be linked into the tree, cannot be opened by another user, and disappears when the last
descriptor closes -- including when the process dies.

I/O goes through ``pwrite``/``preadv`` on the descriptor, never through a mapping: a caller reads
into a buffer it already populated (see :mod:`vmmswap.dataplane.page_handler`), so no page table of
this
process is touched per page, and a read never lands in userfaultfd-registered memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from types import TracebackType
from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.crash_points import crash_point
from vmmswap.dataplane.page_state import PageState
from vmmswap.dataplane.present_list import Indices, PresentList, consecutive_runs
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE

#: The largest guest a u32 slot array can describe (slot + 1 must fit; 0 means "none").
MAX_PAGES: Final = (1 << 32) - 2

#: Pages handed to one ``posix_fadvise`` when prefetching or dropping the cache.
_ADVISE_MAX_RUNS: Final = 256
#: Buffers per ``pwritev`` (the system's limit, asked of libc).
_IOV_MAX: Final = max(1, os.sysconf("SC_IOV_MAX"))
#: ``gather(first, count)``: the memory of ``pages[first:first + count]`` of a write, as
#: buffers to write back to back.
Gather = Callable[[int, int], list[memoryview]]


class SwapFile:
    """A packed swap file with per-page slot state.

    ``num_pages`` is the number of guest pages it can describe (all regions back to back), and
    ``page_size`` the guest's page: a slot holds one guest page, so on 2 MiB hugetlbfs memory a
    slot is 2 MiB and a huge page is written, read and freed whole.
    """

    def __init__(self, fd: int, num_pages: int | None, *, owns_fd: bool = False,
                 page_size: int = PAGE_SIZE) -> None:
        self._fd = fd
        self._owns_fd = owns_fd
        self.page_size = page_size
        self._num_pages = -1
        self._slots: npt.NDArray[np.uint32] = np.zeros(0, dtype=np.uint32)
        self._current = PresentList(0)
        self._used = PresentList(0)
        self._used_count = 0
        self._file_end = 0  # slots at or past it have never been written
        self._free_hint = 0  # no free slot below it
        #: Where the high-water mark is kept for a successor (the page state's header).
        self._end_cell: npt.NDArray[np.uint64] = np.zeros(1, dtype="<u8")
        if num_pages is not None:
            self.ensure_pages(num_pages, page_size)

    def _truncate(self) -> None:
        # Whatever the descriptor held before is not ours to trust: start empty.
        os.ftruncate(self._fd, 0)

    def ensure_pages(self, num_pages: int, page_size: int = PAGE_SIZE) -> None:
        """Size the page state for ``num_pages`` guest pages of ``page_size`` bytes (once), or
        check it matches."""
        if page_size < PAGE_SIZE or page_size % PAGE_SIZE:
            raise ValueError(f"swap file page size {page_size} is not a multiple of {PAGE_SIZE}")
        if self._num_pages >= 0:
            if num_pages != self._num_pages or page_size != self.page_size:
                raise ValueError(f"the swap file describes {self._num_pages} pages of "
                                 f"{self.page_size} bytes, the guest has {num_pages} of "
                                 f"{page_size}")
            return
        self.page_size = page_size
        if not 0 <= num_pages <= MAX_PAGES:
            raise ValueError(f"a swap file describes at most {MAX_PAGES} pages, got {num_pages}")
        self._truncate()
        self._num_pages = num_pages
        self._slots = np.zeros(num_pages, dtype=np.uint32)
        self._current = PresentList(num_pages)
        self._used = PresentList(num_pages)

    def attach_state(self, state: PageState, *, fresh: bool) -> None:
        """Keep the page state in ``state``'s arrays (shared memory a successor can map).

        ``fresh``: the file is truncated and the state starts empty (the caller reset it).
        Otherwise this is a successor's view: the file is kept and the counters are rebuilt
        from the bitmaps -- the used-slot bitmap up to the high-water mark only, so the cost
        follows the file, not the guest.
        """
        if self._num_pages >= 0:
            raise ValueError("the swap file's page state is already sized")
        if not 0 <= state.num_pages <= MAX_PAGES:
            raise ValueError(f"a swap file describes at most {MAX_PAGES} pages, got "
                             f"{state.num_pages}")
        self.page_size = state.page_size
        self._num_pages = state.num_pages
        self._slots = state.slots
        self._current = PresentList.over(state.file_current, state.num_pages)
        self._used = PresentList.over(state.slot_used, state.num_pages)
        self._end_cell = state.file_end
        if fresh:
            self._truncate()
            self._end_cell[0] = 0
            self._file_end = self._used_count = self._free_hint = 0
            return
        self._file_end = min(int(self._end_cell[0]), state.num_pages)
        self._used_count = self._used.count(0, self._file_end)
        self._free_hint = 0

    @classmethod
    def from_fd(cls, fd: int, num_pages: int | None = None) -> SwapFile:
        """Take ownership of an open swap file (e.g. one the VMM created and sent over).

        The file is truncated: its old content is never trusted. Without ``num_pages`` the
        page state is sized by the :class:`~vmmswap.dataplane.page_handler.PageHandler` it is given
        to.
        """
        try:
            return cls(fd, num_pages, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, swap_dir: str | os.PathLike[str], num_pages: int | None, *,
               page_size: int = PAGE_SIZE) -> SwapFile:
        """A new nameless file (O_TMPFILE, mode 0600) in ``swap_dir``."""
        try:
            fd = os.open(swap_dir, os.O_TMPFILE | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            hint = ""
            if err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                hint = (" (the file system does not support O_TMPFILE; use ext4, xfs, btrfs or "
                        "tmpfs)")
            raise OSError(err.errno, f"cannot create the swap file in {os.fspath(swap_dir)!r}: "
                          f"{err.strerror}{hint}") from err
        try:
            return cls(fd, num_pages, owns_fd=True, page_size=page_size)
        except BaseException:
            os.close(fd)
            raise

    # --- descriptor -----------------------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the swap file is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the descriptor if this object owns it. Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._owns_fd:
                os.close(fd)

    def __enter__(self) -> SwapFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- sizes and counters ---------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        """Guest pages described (-1 until sized)."""
        return self._num_pages

    @property
    def current_pages(self) -> int:
        """Pages whose current content is in the file (crosvm's ``swap_pages``)."""
        return self._current.count()

    @property
    def used_slots(self) -> int:
        """Slots in use (current or kept for trim)."""
        return self._used_count

    @property
    def file_pages(self) -> int:
        """The file's length in pages (its high-water mark)."""
        return self._file_end

    @property
    def nbytes(self) -> int:
        """Bytes of page-state arrays."""
        return int(self._slots.nbytes) + self._current.nbytes + self._used.nbytes

    @property
    def current(self) -> PresentList:
        """The bitmap of pages whose file copy is current (read-only use, for scans)."""
        return self._current

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self._num_pages:
            raise IndexError(f"page range [{start}, {end}) is outside [0, {self._num_pages})")

    # --- page state -----------------------------------------------------------------------------
    def slot(self, page: int) -> int:
        """The page's slot, or -1 if it has none."""
        return int(self._slots.item(page)) - 1

    def is_current(self, page: int) -> bool:
        return self._current.get(page)

    def slots_of(self, start: int, end: int) -> npt.NDArray[np.int64]:
        """Slots of ``[start, end)`` (-1 where a page has none)."""
        self._check_range(start, end)
        return self._slots[start:end].astype(np.int64) - 1

    def slots_at(self, pages: Indices) -> npt.NDArray[np.int64]:
        """Slots of the given pages (-1 where a page has none)."""
        return self._slots[pages].astype(np.int64) - 1

    def slot_runs(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """``(first_page, first_slot, pages)`` runs of consecutive slots covering the range.

        Every page of the range must have a slot.
        """
        slots = self.slots_of(start, end)
        if slots.size == 0:
            return []
        if int(slots.min()) < 0:
            raise ValueError(f"a page in [{start}, {end}) has no slot")
        return [(start + first, int(slots[first]), count)
                for first, count in consecutive_runs(slots)]

    def clear_current(self, start: int, end: int) -> None:
        """The pages went back to the guest: their file copies are stale, slots are kept."""
        self._current.clear_range(start, end)

    def mark_current(self, pages: Indices) -> None:
        """The pages' slots hold their current content again (trim found them clean)."""
        if pages.size and int(self._slots[pages].min()) == 0:
            raise ValueError("mark_current: a page has no slot")
        self._current.set_indices(pages)

    def free_range(self, start: int, end: int) -> int:
        """Forget ``[start, end)``: slots return to the free list. Returns slots freed.

        Order (crash consistency): the file copies stop being current first, then the slots
        are released, then the pages forget them; a slot is never free while a page still
        names it except inside this call, which a successor redoes whole (the journal's
        REMOVE)."""
        self._check_range(start, end)
        self._current.clear_range(start, end)
        held = self._slots[start:end]
        nz = np.flatnonzero(held)
        if nz.size:
            self._release_slots(held[nz].astype(np.int64) - 1)
            held[nz] = 0
        return int(nz.size)

    def free_pages(self, pages: Indices) -> int:
        """Forget the given pages (slots return to the free list). Returns slots freed."""
        if pages.size == 0:
            return 0
        self._current.set_indices(pages, False)
        held = self._slots[pages]
        has = held != 0
        if has.any():
            self._release_slots(held[has].astype(np.int64) - 1)
            self._slots[pages[has]] = 0
        return int(np.count_nonzero(has))

    def reconcile_slots(self, pages: Indices, slots: Indices) -> int:
        """After a crash in a step that was giving ``slots[i]`` to ``pages[i]`` or taking it
        away: a slot is used exactly when its page names it. Returns slots released."""
        if pages.size == 0:
            return 0
        named = self._slots[pages].astype(np.int64) - 1 == slots
        used = self._used.test(slots)
        orphan = slots[~named & used]
        if orphan.size:
            self._used.set_indices(orphan, False)
        missing = slots[named & ~used]
        if missing.size:  # cannot happen with the write order below; repaired all the same
            self._used.set_indices(missing)
        self._used_count = self._used.count(0, self._file_end) if self._file_end else 0
        self._free_hint = 0
        return int(orphan.size)

    def _release_slots(self, slots: npt.NDArray[np.int64]) -> None:
        self._used.set_indices(slots, False)
        self._used_count -= int(slots.size)
        self._free_hint = min(self._free_hint, int(slots.min()))

    def cut(self, slots: int) -> None:
        """Shorten the file to ``slots`` slots. Every slot at or past it must be free."""
        if slots < self._file_end:
            if self._used.count(slots, self._file_end):
                raise ValueError(f"cut: slots at or past {slots} are still in use")
            os.ftruncate(self._fd, slots * self.page_size)
            self._file_end = slots
            self._end_cell[0] = slots
            self._free_hint = min(self._free_hint, slots)

    # --- allocation -----------------------------------------------------------------------------
    def _allocate(self, count: int) -> npt.NDArray[np.int64]:
        """``count`` free slots, lowest first (tentative: nothing is marked used yet)."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        reused = np.zeros(0, dtype=np.int64)
        if self._used_count < self._file_end:  # a hole below the high-water mark
            reused, _ = self._used.collect(self._free_hint, self._file_end, count, value=False)
        rest = count - int(reused.size)
        if self._file_end + rest > self._num_pages:
            raise RuntimeError("swap file slot accounting is inconsistent: out of slots")
        fresh = np.arange(self._file_end, self._file_end + rest, dtype=np.int64)
        return np.concatenate((reused, fresh)) if reused.size else fresh

    # --- I/O ------------------------------------------------------------------------------------
    def write_pages(self, pages: Indices, data: memoryview) -> None:
        """Write ``pages`` (ascending) whose contents lie back to back in ``data``; commit.

        Pages that already own a slot (a stale copy kept for trim) are rewritten in place; the
        others get free slots, lowest first. The page state changes only after every byte is
        written: on ``OSError`` (ENOSPC, EIO) nothing is committed and the caller still holds the
        data, so no page is lost. (A rewritten stale slot may then hold part of the new data;
        it was stale anyway, and trim only trusts a slot after a full comparison.)
        """
        n = int(pages.size)
        ps = self.page_size
        if data.nbytes < n * ps:
            raise ValueError(f"{n} pages need {n * ps} bytes, the buffer has "
                             f"{data.nbytes}")
        if n == 0:
            return
        slots = self.plan_slots(pages)
        self.write_planned(pages, slots, data)

    def plan_slots(self, pages: Indices) -> npt.NDArray[np.int64]:
        """The slot each of ``pages`` will be written to: its own (a stale copy kept for
        trim), else a free one, lowest first. Nothing is marked yet."""
        existing = self._slots[pages].astype(np.int64) - 1
        need = existing < 0
        new = self._allocate(int(np.count_nonzero(need)))
        slots = existing.copy()
        slots[need] = new
        return slots

    def write_planned(self, pages: Indices, slots: npt.NDArray[np.int64],
                      data: memoryview | Gather) -> None:
        """Write ``pages`` to their planned ``slots`` and commit (see :meth:`write_pages`).

        ``data``: the pages back to back, or a :data:`Gather` naming where each run of them
        is (swap-out writes straight from the staging mapping, one ``pwritev`` per run of
        consecutive slots).

        Commit order (crash consistency): the high-water mark first (a successor never
        allocates a slot below it as fresh), the data, the slots' used bits, the pages'
        slots, and the current bits last: until then the pages' staging copies are what
        counts, after it the two copies are identical.
        """
        ps = self.page_size
        top = int(slots.max()) + 1
        if top > self._file_end:
            self._end_cell[0] = top
        for first, count, slot in _segments(slots):
            if isinstance(data, memoryview):
                self._pwrite_all(data[first * ps:(first + count) * ps], slot * ps)
            else:
                self._pwritev_all(data(first, count), slot * ps)
        crash_point("out.written")
        existing = self._slots[pages].astype(np.int64) - 1
        need = existing != slots
        new = slots[need]
        if new.size:
            self._used.set_indices(new)
            crash_point("out.used")
            self._slots[pages[need]] = (new + 1).astype(np.uint32)
            crash_point("out.slots")
            self._used_count += int(new.size)
            self._file_end = max(self._file_end, top)
            self._free_hint = int(new.max()) + 1 if self._used_count < self._file_end else \
                self._file_end
        self._current.set_indices(pages)

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        done = 0
        total = data.nbytes
        while done < total:
            written = os.pwrite(self._fd, data[done:], offset + done)
            if written <= 0:
                raise OSError(errno.EIO, f"swap file write at {offset + done:#x} wrote nothing")
            done += written

    def _pwritev_all(self, iov: list[memoryview], offset: int) -> None:
        at = 0  # index of the first view not written whole
        while at < len(iov):
            written = os.pwritev(self._fd, iov[at:at + _IOV_MAX], offset)
            if written <= 0:
                raise OSError(errno.EIO, f"swap file write at {offset:#x} wrote nothing")
            offset += written
            while at < len(iov) and written >= iov[at].nbytes:
                written -= iov[at].nbytes
                at += 1
            if written:
                iov[at] = iov[at][written:]

    def read_pages(self, start: int, end: int, buf: memoryview) -> None:
        """Read the slots of ``[start, end)`` (every page must have one) into ``buf``.

        **Safety**: ``buf`` must be this process's own memory, populated, and never registered
        with userfaultfd: a read into a registered missing page would fault into the very
        handler that is supposed to serve it.
        """
        for first, slot, count in self.slot_runs(start, end):
            at = (first - start) * self.page_size
            self.read_slots(slot, buf[at:at + count * self.page_size])

    def read_slots(self, slot: int, buf: memoryview) -> None:
        """Read consecutive slots from ``slot`` into ``buf`` (see :meth:`read_pages`)."""
        done = 0
        total = buf.nbytes
        offset = slot * self.page_size
        while done < total:
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got <= 0:
                raise OSError(errno.EIO, f"swap file is shorter than its slot table: no data at "
                              f"{offset + done:#x}")
            done += got

    def map_pages(self, start: int, end: int) -> tuple[int, Callable[[], None]] | None:
        """Map the slots of ``[start, end)`` read-only and populated, for a COPY to read them
        in place; returns the address and the function that unmaps them, or None when their
        slots are not consecutive (the caller reads them instead).

        Why a mapping here, where the handler otherwise maps nothing: for 2 MiB pages it saves
        a whole copy (measured on the ext4 CI host: mapping and populating 2 MiB of the file's
        page cache and unmapping it takes 12-15 us, reading it with ``preadv`` 110 us, as long
        as the COPY itself). **Safety**: the mapping is read-only, of this process only, never
        registered with userfaultfd, and unmapped right after the COPY; the slots it covers
        are written and inside the file, so no access can reach past its end.
        """
        slots = self.slots_of(start, end)
        if slots.size == 0:
            return None
        first = int(slots[0])
        if first < 0 or int(slots[-1]) - first != slots.size - 1 or (
                slots.size > 1 and not bool((np.diff(slots) == 1).all())):
            return None
        length = int(slots.size) * self.page_size
        addr = libc.mmap(0, length, libc.PROT_READ, libc.MAP_SHARED | libc.MAP_POPULATE,
                         self.fileno(), first * self.page_size)

        def release() -> None:
            libc.munmap(addr, length)

        return addr, release

    def _advise(self, pages: Indices, advice: int) -> None:
        """posix_fadvise over the slots of ``pages``, coalesced in *file* order: pages far
        apart in the guest usually sit side by side in the packed file."""
        slots = self.slots_at(pages)
        slots = np.sort(slots[slots >= 0])
        for first, count in consecutive_runs(slots)[:_ADVISE_MAX_RUNS]:
            with contextlib.suppress(OSError):  # advice only
                os.posix_fadvise(self._fd, int(slots[first]) * self.page_size,
                                 count * self.page_size, advice)

    def prefetch(self, pages: Indices) -> None:
        """Ask the kernel to read the slots of ``pages`` ahead, asynchronously."""
        self._advise(pages, os.POSIX_FADV_WILLNEED)

    def drop_cache(self, start: int, end: int) -> None:
        """Drop the page cache of ``[start, end)``'s slots (their data now lives in the guest)."""
        self._advise(np.arange(start, end, dtype=np.int64), os.POSIX_FADV_DONTNEED)

    def file_bytes(self) -> int:
        return os.fstat(self.fileno()).st_size

    def __repr__(self) -> str:
        return (f"<SwapFile fd={self._fd} pages={self._num_pages} used={self._used_count} "
                f"end={self._file_end}>")


def _segments(slots: npt.NDArray[np.int64]) -> list[tuple[int, int, int]]:
    """``(first_index, count, first_slot)`` runs where slots are consecutive."""
    return [(first, count, int(slots[first])) for first, count in consecutive_runs(slots)]
