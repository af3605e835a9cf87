"""The page state in a memfd: every per-page array of the handler, where a successor finds it.

Why a memfd: the monitor may die at any instant (SIGKILL), and everything that says where a
guest page is must outlive it. The VMM-side controller creates the memfd (:meth:`PageState.create`)
and keeps it for the VMM's lifetime, together with the staging memfd and the swap file; each
monitor maps it (``MAP_SHARED``) and its numpy arrays -- the staging bitmap, the swap file's u32
slots and bitmaps -- are views of that mapping (``np.frombuffer``), so every store the handler
makes is in the shared file the moment it is made. A successor attaches (:meth:`PageState.attach`)
and sees exactly what its predecessor wrote: resuming costs a mapping, never a scan of every page.

Layout (little-endian, every array 4 KiB aligned; the file is sparse until written)::

    0      header: magic, version, page size, regions (guest/host address, size, pages),
           generation, the swap file's high-water mark, the journal record
    4096   control area (CONTROL_AREA_BYTES): the control layer's; the data plane never reads it
    8192   journal entries: JOURNAL_CAPACITY (page u32, slot u32) pairs of the step in progress
    ...    staging present bitmap, file-current bitmap, slot-used bitmap (one bit per page),
           slots (u32 per page: 0 none, else slot + 1), discard-pending bytes (u8 per page),
           discard-made bytes (u8 per page)

About 4.4 bytes per guest page are ever touched by swapping (1.09 MiB per GiB of 4 KiB pages),
plus two bytes per page that the VMM writes when it discards (see :mod:`.discard_log`).

The journal (:class:`Journal`) records a multi-array step that a crash could leave half done:
which pages and slots a swap-out or a trim is changing, which range a REMOVE is dropping. It is
written before the step and cleared after it; :meth:`PageHandler.resume
<vmmswap.dataplane.page_handler.PageHandler.resume>` finishes or undoes what it names.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE

__all__ = ["CONTROL_AREA_BYTES", "JOURNAL_CAPACITY", "Journal", "JournalOp", "PageState",
           "PageStateError"]

MAGIC: Final = int.from_bytes(b"VMMSWPST", "little")
LAYOUT_VERSION: Final = 2
HEADER_BYTES: Final = 4096
CONTROL_AREA_BYTES: Final = 4096
#: (page, slot) pairs one journalled step may name: a swap-out chunk (2 MiB of 4 KiB pages is
#: 512) or a trim step (MAX_TRIM_PAGES = 1024).
JOURNAL_CAPACITY: Final = 1024
MAX_REGIONS: Final = 64
_ALIGN: Final = 4096
_CONTROL_OFFSET: Final = HEADER_BYTES
_JOURNAL_OFFSET: Final = _CONTROL_OFFSET + CONTROL_AREA_BYTES
_ARRAYS_OFFSET: Final = _JOURNAL_OFFSET + JOURNAL_CAPACITY * 8

# Header words (u64 each).
_W_MAGIC, _W_VERSION, _W_TOTAL, _W_PAGE_SIZE, _W_REGIONS, _W_PAGES = 0, 1, 2, 3, 4, 5
_W_GENERATION, _W_FILE_END = 6, 7
#: Nonzero while the monitor has guest memory registered (see discard_log.py).
_W_REGISTERED = 8
_W_JOP, _W_JCOUNT, _W_JA, _W_JB = 16, 17, 18, 19
_W_REGION_TABLE = 32  # 4 words per region: guest_addr, host_addr, size, pages
_HEADER_WORDS: Final = HEADER_BYTES // 8
_PAGE_SIZE_MAX: Final = 1 << 30


class PageStateError(ValueError):
    """The descriptor does not hold a page state this code can use (wrong, truncated, foreign,
    or describing other regions); nothing was changed."""


class JournalOp:
    """What the journal's step is (a u64 in the header; 0 = nothing in progress)."""

    NONE: Final = 0
    #: Swap-out: entries are (page, slot the page is being written to).
    SWAP_OUT: Final = 1
    #: Freeing file slots (trim's zero pages): entries are (page, slot being freed).
    FREE_SLOTS: Final = 2
    #: REMOVE of pages [a, b): redo it whole.
    REMOVE: Final = 3


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True, slots=True)
class _Layout:
    num_pages: int
    staging_present: int
    file_current: int
    slot_used: int
    slots: int
    discard: int
    discard_made: int
    total: int

    @classmethod
    def of(cls, num_pages: int) -> _Layout:
        bitmap = _round_up(((num_pages + 63) // 64) * 8)
        at = _ARRAYS_OFFSET
        staging_present = at
        at += bitmap
        file_current = at
        at += bitmap
        slot_used = at
        at += bitmap
        slots = at
        at += _round_up(num_pages * 4)
        discard = at
        at += _round_up(num_pages)
        discard_made = at
        at += _round_up(num_pages)
        return cls(num_pages, staging_present, file_current, slot_used, slots, discard,
                   discard_made, at)


class Journal:
    """The record of the one multi-array step in progress (see the module docstring)."""

    def __init__(self, header: npt.NDArray[np.uint64], pages: npt.NDArray[np.uint32],
                 slots: npt.NDArray[np.uint32]) -> None:
        self._header = header
        self.pages = pages
        self.slots = slots

    @property
    def op(self) -> int:
        return int(self._header[_W_JOP])

    @property
    def count(self) -> int:
        return int(self._header[_W_JCOUNT])

    @property
    def range(self) -> tuple[int, int]:
        return int(self._header[_W_JA]), int(self._header[_W_JB])

    def record(self, op: int, pages: npt.NDArray[np.int64] | None = None,
               slots: npt.NDArray[np.int64] | None = None, start: int = 0, end: int = 0) -> None:
        """Write the step's record; the op word last, so a half-written record is no record."""
        self._header[_W_JOP] = JournalOp.NONE
        n = 0
        if pages is not None:
            n = int(pages.size)
            if n > JOURNAL_CAPACITY:
                raise ValueError(f"a journalled step names at most {JOURNAL_CAPACITY} pages, "
                                 f"got {n}")
            self.pages[:n] = pages
            assert slots is not None and slots.size == n
            self.slots[:n] = slots
        self._header[_W_JCOUNT] = n
        self._header[_W_JA] = start
        self._header[_W_JB] = end
        self._header[_W_JOP] = op

    def clear(self) -> None:
        self._header[_W_JOP] = JournalOp.NONE


class PageState:
    """A mapped page-state memfd; build it with :meth:`create` or :meth:`attach`."""

    def __init__(self, fd: int, mapping: mmap.mmap, owns_fd: bool) -> None:
        self._fd = fd
        self._owns_fd = owns_fd
        self._mmap: mmap.mmap | None = mapping
        header = np.frombuffer(mapping, dtype="<u8", count=_HEADER_WORDS, offset=0)
        self._header: npt.NDArray[np.uint64] = header
        self.page_size = int(header[_W_PAGE_SIZE])
        self.num_pages = int(header[_W_PAGES])
        self.layout = _Layout.of(self.num_pages)
        n = self.num_pages
        words = (n + 63) // 64
        self.staging_present: npt.NDArray[np.uint64] = np.frombuffer(
            mapping, dtype="<u8", count=words, offset=self.layout.staging_present)
        self.file_current: npt.NDArray[np.uint64] = np.frombuffer(
            mapping, dtype="<u8", count=words, offset=self.layout.file_current)
        self.slot_used: npt.NDArray[np.uint64] = np.frombuffer(
            mapping, dtype="<u8", count=words, offset=self.layout.slot_used)
        self.slots: npt.NDArray[np.uint32] = np.frombuffer(
            mapping, dtype="<u4", count=n, offset=self.layout.slots)
        self.discard_pending: npt.NDArray[np.uint8] = np.frombuffer(
            mapping, dtype=np.uint8, count=n, offset=self.layout.discard)
        #: Set by the VMM once a discard's madvise has returned (discard_log.py): a marked
        #: page with this byte set is no discard in flight, whatever it holds now.
        self.discard_made: npt.NDArray[np.uint8] = np.frombuffer(
            mapping, dtype=np.uint8, count=n, offset=self.layout.discard_made)
        #: The swap file's high-water mark, in slots (a one-element view of the header).
        self.file_end: npt.NDArray[np.uint64] = header[_W_FILE_END:_W_FILE_END + 1]
        self.journal = Journal(
            header,
            np.frombuffer(mapping, dtype="<u4", count=JOURNAL_CAPACITY, offset=_JOURNAL_OFFSET),
            np.frombuffer(mapping, dtype="<u4", count=JOURNAL_CAPACITY,
                          offset=_JOURNAL_OFFSET + JOURNAL_CAPACITY * 4))
        self.control = memoryview(mapping)[_CONTROL_OFFSET:_CONTROL_OFFSET + CONTROL_AREA_BYTES]

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, regions: Sequence[RegionSpec], page_size: int = PAGE_SIZE) -> PageState:
        """A new, zeroed page state for ``regions`` (in host-address order) of ``page_size``
        pages: a memfd (MFD_CLOEXEC) sized once, mapped shared. Generation 0."""
        if page_size < PAGE_SIZE or page_size % PAGE_SIZE or page_size > _PAGE_SIZE_MAX:
            raise ValueError(f"page size {page_size} is not a multiple of {PAGE_SIZE}")
        specs = sorted(regions, key=lambda r: r.host_addr)
        if not specs:
            raise ValueError("a page state needs at least one region")
        if len(specs) > MAX_REGIONS:
            raise ValueError(f"a page state holds at most {MAX_REGIONS} regions, got "
                             f"{len(specs)}")
        for spec in specs:
            if spec.size <= 0 or spec.size % page_size:
                raise ValueError(f"region [{spec.host_addr:#x}, {spec.host_end:#x}) is not a "
                                 f"whole number of {page_size}-byte pages")
        num_pages = sum(s.size // page_size for s in specs)
        layout = _Layout.of(num_pages)
        fd = os.memfd_create("vmmswap page state", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, layout.total)
            header = np.zeros(_HEADER_WORDS, dtype="<u8")
            header[_W_VERSION] = LAYOUT_VERSION
            header[_W_TOTAL] = layout.total
            header[_W_PAGE_SIZE] = page_size
            header[_W_REGIONS] = len(specs)
            header[_W_PAGES] = num_pages
            for i, spec in enumerate(specs):
                at = _W_REGION_TABLE + 4 * i
                header[at:at + 4] = (spec.guest_addr, spec.host_addr, spec.size,
                                     spec.size // page_size)
            # The magic last: a memfd whose creation was cut short is not a page state.
            os.pwrite(fd, header.tobytes(), 0)
            os.pwrite(fd, MAGIC.to_bytes(8, "little"), 0)
            return cls._map(fd, layout.total, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> PageState:
        """Map an existing page state (a successor's view of it). The descriptor stays the
        caller's. PageStateError, with nothing changed, unless ``fd`` holds a whole page state
        of this layout version."""
        try:
            st = os.fstat(fd)
        except OSError as err:
            raise PageStateError(f"page state descriptor {fd}: {err.strerror}") from err
        if not stat.S_ISREG(st.st_mode):
            raise PageStateError(f"page state descriptor {fd} is not a regular file (a memfd)")
        raw = os.pread(fd, HEADER_BYTES, 0)
        if len(raw) < HEADER_BYTES:
            raise PageStateError(f"page state descriptor {fd} holds {st.st_size} bytes: too "
                                 f"short for a {HEADER_BYTES}-byte header (truncated?)")
        header = np.frombuffer(raw, dtype="<u8")
        if int(header[_W_MAGIC]) != MAGIC:
            raise PageStateError(f"descriptor {fd} is not a vmmswap page state (bad magic "
                                 f"{raw[:8]!r})")
        if int(header[_W_VERSION]) != LAYOUT_VERSION:
            raise PageStateError(f"page state layout version {int(header[_W_VERSION])} is not "
                                 f"the supported {LAYOUT_VERSION}")
        ps, pages, nreg = (int(header[_W_PAGE_SIZE]), int(header[_W_PAGES]),
                           int(header[_W_REGIONS]))
        if ps < PAGE_SIZE or ps % PAGE_SIZE or ps > _PAGE_SIZE_MAX or not 0 < nreg <= MAX_REGIONS:
            raise PageStateError(f"page state header is corrupt: page size {ps}, {nreg} regions")
        table = header[_W_REGION_TABLE:_W_REGION_TABLE + 4 * nreg].reshape(nreg, 4)
        if int(table[:, 3].sum()) != pages or bool((table[:, 2] != table[:, 3] * ps).any()):
            raise PageStateError("page state header is corrupt: its region table does not add "
                                 f"up to its {pages} pages")
        total = _Layout.of(pages).total
        if int(header[_W_TOTAL]) != total or st.st_size != total:
            raise PageStateError(f"page state descriptor {fd} holds {st.st_size} bytes, its "
                                 f"layout needs {total} (truncated or resized?)")
        return cls._map(fd, total, owns_fd=False)

    @classmethod
    def _map(cls, fd: int, total: int, owns_fd: bool) -> PageState:
        mapping = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(fd, mapping, owns_fd)

    # --- descriptor -----------------------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the page state is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Unmap (once no array view is left) and close the memfd if this object created it.
        Idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        mapping, self._mmap = self._mmap, None
        with contextlib.suppress(BufferError):  # a slice of it is still held
            self.control.release()
        if mapping is not None:
            # Arrays still viewed: unmapped when the last view goes.
            with contextlib.suppress(BufferError):
                mapping.close()
        if self._owns_fd:
            os.close(fd)

    def __enter__(self) -> PageState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- header ---------------------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        """Whether a monitor has guest memory registered with userfaultfd: set before it
        registers (with the VMM frozen), cleared after it unregisters. The VMM reads it after
        a discard's madvise (discard_log.py): while it is clear, no REMOVE event was made."""
        return bool(self._header[_W_REGISTERED])

    @registered.setter
    def registered(self, value: bool) -> None:
        self._header[_W_REGISTERED] = int(value)

    @property
    def generation(self) -> int:
        """How many handlers have taken this state (create and each resume add one)."""
        return int(self._header[_W_GENERATION])

    def next_generation(self) -> int:
        self._header[_W_GENERATION] = self._header[_W_GENERATION] + np.uint64(1)
        return self.generation

    def regions(self) -> list[RegionSpec]:
        """The regions the state describes, in host-address order."""
        n = int(self._header[_W_REGIONS])
        table = self._header[_W_REGION_TABLE:_W_REGION_TABLE + 4 * n].reshape(n, 4)
        return [RegionSpec(int(g), int(h), int(s)) for g, h, s, _ in table]

    def check_regions(self, regions: Sequence[RegionSpec], page_size: int) -> None:
        """PageStateError unless the state describes exactly ``regions`` of ``page_size``."""
        mine = self.regions()
        theirs = sorted(regions, key=lambda r: r.host_addr)
        if page_size != self.page_size or mine != theirs:
            raise PageStateError(f"the page state describes {mine} in {self.page_size}-byte "
                                 f"pages, the handler was given {theirs} in {page_size}-byte "
                                 "pages")

    def reset(self) -> None:
        """Zero the journal and every per-page array of the handler (a fresh enable), without
        allocating: the ranges are punched out of the memfd, so a sparse guest's state stays
        sparse. The discard log is the VMM's and survives: a mark made before the reset by a
        discard whose madvise comes after the enable's registration is what lets a successor
        drop the page staged meanwhile (``discard_log.forget_settled`` clears the settled
        ones at that registration)."""
        start = _JOURNAL_OFFSET
        libc.fallocate(self.fileno(), libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE,
                       start, self.layout.discard - start)
        self._header[_W_FILE_END] = 0
        self._header[_W_JOP] = JournalOp.NONE

    @property
    def nbytes(self) -> int:
        """Bytes of the memfd (its size; only what was written is allocated)."""
        return self.layout.total

    def allocated_bytes(self) -> int:
        """Bytes of the memfd actually allocated."""
        return os.fstat(self.fileno()).st_blocks * 512

    def __repr__(self) -> str:
        return (f"<PageState fd={self._fd} pages={self.num_pages} page_size={self.page_size} "
                f"generation={self.generation}>")
