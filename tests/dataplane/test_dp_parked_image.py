"""ParkedImage: each page read from where the fault handler would serve it, or an error.

The page state is set up by hand here (bits, slots, marks), so each rule is checked on its own:
staging first, then a current swap-file slot, then the memfd; a page being discarded is the
memfd's; a journal naming a step in progress, a current page without a slot and a swap file
shorter than its slots are refused -- never read as zeros.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.dataplane.page_state import JournalOp, PageState
from vmmswap.dataplane.parked_image import ParkedImage, ParkedImageError
from vmmswap.dataplane.present_list import PresentList

PAGE = 4096
#: Two regions, the second *lower* in host addresses: page numbers follow host order, the
#: memory file follows the order the caller gives.
SPECS = [RegionSpec(0, 0x7000_0000_0000, 8 * PAGE),
         RegionSpec(0x100000, 0x6000_0000_0000, 4 * PAGE)]


def page(tag: int) -> bytes:
    return bytes([tag]) * PAGE


@pytest.fixture
def plane(tmp_path: Path):  # type: ignore[no-untyped-def]
    state = PageState.create(sorted(SPECS, key=lambda s: s.host_addr))
    memfds = [os.memfd_create("guest", os.MFD_CLOEXEC) for _ in SPECS]
    for fd, spec in zip(memfds, SPECS, strict=True):
        os.ftruncate(fd, spec.size)
    staging = os.memfd_create("staging", os.MFD_CLOEXEC)
    os.ftruncate(staging, state.num_pages * PAGE)
    swap = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    yield state, memfds, staging, swap
    for fd in (*memfds, staging, swap):
        os.close(fd)
    state.close()


def _image(plane) -> ParkedImage:  # type: ignore[no-untyped-def]
    state, memfds, staging, swap = plane
    return ParkedImage(state, list(zip(SPECS, memfds, strict=True)), staging, swap)


def _read(image: ParkedImage, offset: int = 0, length: int | None = None) -> bytes:
    buf = bytearray(image.size - offset if length is None else length)
    image.read_into(offset, memoryview(buf))
    return bytes(buf)


def test_each_page_from_where_a_fault_would_be_served(plane) -> None:  # type: ignore[no-untyped-def]
    state, memfds, staging, swap = plane
    staged = PresentList.over(state.staging_present, state.num_pages)
    current = PresentList.over(state.file_current, state.num_pages)
    # Global pages: region 1 (lower host address) is 0..3, region 0 is 4..11.
    os.pwrite(memfds[0], page(1), 0)            # region 0 page 0: resident
    os.pwrite(memfds[0], page(9), 1 * PAGE)     # page 1: stale memfd bytes, staging wins
    staged.set_range(5, 6)
    os.pwrite(staging, page(2), 5 * PAGE)
    current.set_range(6, 8)                     # pages 2, 3: the file, slots 7 and 8
    state.slots[6:8] = [8, 9]
    os.pwrite(swap, page(3) + page(4), 7 * PAGE)
    staged.set_range(8, 9)                      # page 4: staged *and* current: staging
    current.set_range(8, 9)
    state.slots[8] = 1
    os.pwrite(staging, page(5), 8 * PAGE)
    os.pwrite(swap, page(6), 0)
    staged.set_range(9, 10)                     # page 5: being discarded: the memfd's
    state.discard_pending[9] = 1
    os.pwrite(staging, page(7), 9 * PAGE)
    os.pwrite(memfds[1], page(8), 3 * PAGE)     # region 1 page 3 (global 3): resident
    image = _image(plane)
    want = (page(1) + page(2) + page(3) + page(4) + page(5) + bytes(PAGE) + bytes(2 * PAGE)
            + bytes(3 * PAGE) + page(8))
    assert _read(image) == want
    assert (image.counts.staging, image.counts.swap_file) == (2 * PAGE, 2 * PAGE)
    # Reads that start and end anywhere on a page boundary agree with the whole.
    for off, n in ((PAGE, 3 * PAGE), (7 * PAGE, 2 * PAGE), (2 * PAGE, PAGE)):
        assert _read(image, off, n) == want[off:off + n]
    with pytest.raises(ParkedImageError, match="whole 4 KiB"):
        image.read_into(100, memoryview(bytearray(PAGE)))
    with pytest.raises(ParkedImageError, match="outside"):
        image.read_into(image.size, memoryview(bytearray(PAGE)))


def test_a_step_in_progress_is_refused(plane) -> None:  # type: ignore[no-untyped-def]
    state = plane[0]
    state.journal.record(JournalOp.SWAP_OUT, np.array([4], dtype=np.int64),
                         np.array([0], dtype=np.int64))
    with pytest.raises(ParkedImageError, match="journal"):
        _image(plane)
    state.journal.clear()
    _image(plane)


def test_missing_bytes_are_an_error_never_zeros(plane) -> None:  # type: ignore[no-untyped-def]
    state = plane[0]
    current = PresentList.over(state.file_current, state.num_pages)
    current.set_range(4, 5)
    image = _image(plane)
    with pytest.raises(ParkedImageError, match="no slot"):
        _read(image)
    state.slots[4] = 3          # slot 2: past the end of the (empty) swap file
    with pytest.raises(ParkedImageError, match="swap file ended"):
        _read(image)


def test_huge_pages_are_read_in_4k_pieces(tmp_path: Path) -> None:
    """A 2 MiB page state (hugetlbfs guests): a page's source is one bit, and a read of a few
    4 KiB pages inside a huge page takes them at the right offset of staging or the file."""
    huge = 2 << 20
    spec = RegionSpec(0, 0x7000_0000_0000, 4 * huge)
    state = PageState.create([spec], page_size=huge)
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    staging = os.memfd_create("staging", os.MFD_CLOEXEC)
    swap = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(memfd, spec.size)
        os.ftruncate(staging, state.num_pages * huge)
        rng = np.random.default_rng(5)
        blobs = [rng.integers(0, 256, huge, dtype=np.uint8).tobytes() for _ in range(3)]
        os.pwrite(memfd, blobs[0], 0)                       # huge page 0: resident
        PresentList.over(state.staging_present, state.num_pages).set_range(1, 2)
        os.pwrite(staging, blobs[1], 1 * huge)              # huge page 1: staging
        PresentList.over(state.file_current, state.num_pages).set_range(2, 3)
        state.slots[2] = 2                                  # huge page 2: file slot 1
        os.pwrite(swap, blobs[2], 1 * huge)
        image = ParkedImage(state, [(spec, memfd)], staging, swap)
        want = blobs[0] + blobs[1] + blobs[2] + bytes(huge)
        assert _read(image) == want
        for off, n in ((huge - PAGE, 2 * PAGE), (huge + 5 * PAGE, 3 * PAGE),
                       (2 * huge + 511 * PAGE, 2 * PAGE), (3 * huge - PAGE, huge)):
            assert _read(image, off, n) == want[off:off + n], (off, n)
    finally:
        for fd in (memfd, staging, swap):
            os.close(fd)
        state.close()
