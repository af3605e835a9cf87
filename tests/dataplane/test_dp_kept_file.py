"""KeptFile: which clean pages leave guest memory without a copy, and which never may.

No uffd is needed: the pages are put in guest memory through the file (as a swap-in would have
left them), the swap file holds the same content, and the tests look at what ``release`` does
to the memfd (SEEK_DATA) and to the file's current bits.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from huge_settings import HugeSettings
from vmmswap.dataplane import move
from vmmswap.dataplane.guest_memory import RegionSpec, data_ranges
from vmmswap.dataplane.kept_file import KeptFile
from vmmswap.dataplane.page_fill import FillOutcome
from vmmswap.dataplane.page_store import Region
from vmmswap.dataplane.present_list import runs_of
from vmmswap.dataplane.staging import StagingMemory
from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE

N = 64


class Guest:
    def __init__(self, swap_dir: Path) -> None:
        self.memfd = os.memfd_create("kept file test", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, N * PAGE_SIZE)
        data = np.repeat(np.arange(1, N + 1, dtype=np.uint8), PAGE_SIZE).tobytes()
        os.pwrite(self.memfd, data, 0)
        self.swap = SwapFile.create(swap_dir, N)
        self.swap.write_pages(np.arange(N, dtype=np.int64), memoryview(data))
        self.swap.clear_current(0, N)  # paged back in: the slots stay
        self.kept = KeptFile([Region(RegionSpec(0, 0x10000000, N * PAGE_SIZE), self.memfd, 0)],
                             self.swap)
        self.kept.note_filled(0, FillOutcome(done=N, filled=N))

    def resident(self) -> set[int]:
        return {p for start, end in data_ranges(self.memfd, N * PAGE_SIZE)
                for p in range(start // PAGE_SIZE, end // PAGE_SIZE)}

    def close(self) -> None:
        self.swap.close()
        os.close(self.memfd)


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    g = Guest(tmp_path)
    yield g
    g.close()


def _written(*pages: int) -> np.ndarray:
    out = np.zeros(N, dtype=np.bool_)
    out[list(pages)] = True
    return out


def _release(guest: Guest, written: np.ndarray | None) -> int:
    """release, then the punch of the released pages a move to staging would make (without
    staging the rest); the pages released."""
    released = guest.kept.release(written)
    if released is not None:
        for first, end in runs_of(np.flatnonzero(released)):
            libc.fallocate(guest.memfd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE,
                           first * PAGE_SIZE, (end - first) * PAGE_SIZE)
    return guest.kept.released_pages


def test_unwritten_pages_leave_without_a_copy(guest: Guest) -> None:
    released = _release(guest, _written(3, 4, 40))
    assert released == N - 3
    assert guest.resident() == {3, 4, 40}
    current = guest.swap.current.bools(0, N)
    assert np.flatnonzero(~current).tolist() == [3, 4, 40]
    assert guest.kept.dirty_pages == 3 and guest.kept.count == 0
    # The file copy of a released page is the page: reading it back gives its content.
    buf = bytearray(PAGE_SIZE)
    guest.swap.read_pages(10, 11, memoryview(buf))
    assert buf == bytes([11]) * PAGE_SIZE


def test_a_failed_scan_releases_nothing(guest: Guest) -> None:
    assert _release(guest, None) == 0
    assert guest.resident() == set(range(N))
    assert guest.swap.current_pages == 0
    assert guest.kept.dirty_pages == N and guest.kept.count == 0


def test_a_page_the_vmm_punched_keeps_its_hole(guest: Guest) -> None:
    """A clean page that became a hole (the VMM punched it: it reads as zeros now) must not
    get its old file copy back."""
    libc.fallocate(guest.memfd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE,
                   7 * PAGE_SIZE, PAGE_SIZE)
    assert _release(guest, _written()) == N - 1
    assert not guest.swap.is_current(7)


def test_a_fill_that_met_an_existing_page_marks_nothing(guest: Guest) -> None:
    guest.kept.forget_all()
    guest.kept.note_filled(0, FillOutcome(done=8, filled=7, existed=1))
    assert guest.kept.count == 0
    guest.kept.note_filled(8, FillOutcome(done=4, filled=4))
    assert guest.kept.count == 4


def test_limit_cuts_the_file_and_forgets_the_pages_beyond(guest: Guest) -> None:
    freed = guest.kept.limit(16 * PAGE_SIZE)
    assert freed == N - 16
    assert guest.kept.count == 16
    assert guest.swap.file_pages == 16
    assert os.fstat(guest.swap.fileno()).st_size == 16 * PAGE_SIZE
    assert _release(guest, _written()) == 16
    assert guest.resident() == set(range(16, N))


def test_limit_refuses_while_pages_live_in_the_file(guest: Guest) -> None:
    _release(guest, _written())
    with pytest.raises(ValueError, match="still live"):
        guest.kept.limit(0)


def test_a_scan_of_the_wrong_size_is_refused(guest: Guest) -> None:
    with pytest.raises(ValueError, match="one bool slot per page"):
        guest.kept.release(np.zeros(N - 1, dtype=np.bool_))
    assert guest.kept.count == N  # nothing changed
    assert guest.resident() == set(range(N))


def test_the_move_punches_released_pages_without_copying_them(guest: Guest) -> None:
    released = guest.kept.release(_written(3, 4, 40))
    staging = StagingMemory(N)
    try:
        moved = move.move_to_staging([move.MoveRegion(guest.memfd, N * PAGE_SIZE, 0)],
                                     staging, skip=released)
        assert moved == 3
        assert np.flatnonzero(staging.present.bools(0, N)).tolist() == [3, 4, 40]
        assert guest.resident() == set()
        assert guest.swap.current_pages == N - 3
    finally:
        staging.close()


def test_hugetlb_released_pages_are_punched_and_a_zero_one_leaves_the_file(
        huge_settings: HugeSettings, tmp_path: Path) -> None:
    """On hugetlbfs SEEK_DATA cannot tell a hole: the move reads each released huge page, and
    one that reads as zeros (here: punched by the VMM behind the handler's back) stops being
    current in the file, so its old copy is never served; the others are punched unstaged."""
    n, huge = 6, 2 << 20
    huge_settings.reserve_hugetlb(2 * n)
    memfd = os.memfd_create("kept huge", os.MFD_CLOEXEC | os.MFD_HUGETLB | (21 << 26))
    os.ftruncate(memfd, n * huge)
    data = np.repeat(np.arange(1, n + 1, dtype=np.uint8), huge)
    with mmap.mmap(memfd, n * huge) as m:
        m[:] = data.tobytes()
    swap = SwapFile.create(tmp_path, n, page_size=huge)
    staging = StagingMemory(n, page_size=huge)
    try:
        swap.write_pages(np.arange(n, dtype=np.int64), memoryview(data))
        swap.clear_current(0, n)
        kept = KeptFile([Region(RegionSpec(0, 0x40000000, n * huge), memfd, 0, huge)], swap)
        kept.note_filled(0, FillOutcome(done=n, filled=n))
        libc.fallocate(memfd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE,
                       4 * huge, huge)
        written = np.zeros(n, dtype=np.bool_)
        written[1] = True
        released = kept.release(written)
        moved = move.move_to_staging([move.MoveRegion(memfd, n * huge, 0, huge)], staging,
                                     file_current=swap.current, skip=released)
        assert moved == 1 and np.flatnonzero(staging.present.bools(0, n)).tolist() == [1]
        assert np.flatnonzero(swap.current.bools(0, n)).tolist() == [0, 2, 3, 5]
        page = bytearray(huge)
        for p in range(n):
            assert os.preadv(memfd, [page], p * huge) == huge and not any(page[:4096])
    finally:
        staging.close()
        swap.close()
        os.close(memfd)
