"""Swap-in prefetch: the file is read ahead of the copy cursor, measured in the page cache.

The swap file lives on the disk file system of ``tmp_path`` (ext4 here), where
``posix_fadvise(WILLNEED)`` starts reads the test can see: after its data is on disk and out of
the page cache, one small swap-in step must leave the slots *ahead* of what it copied resident
(mincore on a read-only mapping of the file; the test maps the swap file, the data plane never
does). The same step with ``prefetch_bytes=0`` is the negative control: only the pages it
copied, plus the kernel's own short readahead behind ``preadv``, were read.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time

import numpy as np
import pytest

from vmmswap.dataplane.swap_in import DEFAULT_PREFETCH_BYTES, SwapInContext
from vmmswap.uffd.pagesize import PAGE_SIZE, bytes_to_pages

from .conftest import Rig, RigFactory

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
PAGES = bytes_to_pages(24 * MiB)
STEP = 16 * PAGE_SIZE  # one small swap-in step: 64 KiB copied
#: Checked window: from 2 MiB past the copied pages (beyond the kernel's own readahead
#: behind a 64 KiB preadv, 128 KiB by default) to 6 MiB, well inside the 16 MiB prefetch.
AHEAD = (bytes_to_pages(2 * MiB), bytes_to_pages(6 * MiB))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _resident(fd: int, first_slot: int, count: int) -> int:
    """Pages of the file's slots [first_slot, first_slot + count) in the page cache."""
    length = count * PAGE_SIZE
    with mmap.mmap(
        fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=first_slot * PAGE_SIZE
    ) as view:
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        vec = np.zeros(count, dtype=np.uint8)
        if _libc.mincore(address, length, vec.ctypes.data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(np.count_nonzero(vec & 1))


def _swapped_out_rig(make_rig: RigFactory) -> Rig:
    rig = make_rig([(0, PAGES * PAGE_SIZE)])
    rig.write(rig.addr(0), seed=3, pages=PAGES)
    rig.enable()
    assert rig.out_all() == PAGES
    fd = rig.handler.swap_file.fileno()
    os.fsync(fd)  # clean, so DONTNEED really drops it
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert _resident(fd, 0, PAGES) < PAGES // 100, "the page cache was not dropped"
    return rig


def _resident_ahead(rig: Rig, prefetch_bytes: int) -> tuple[int, int]:
    """One 64 KiB swap-in step; then (pages copied, resident slots in the window ahead)."""
    ctx = SwapInContext(rig.handler, prefetch_bytes=prefetch_bytes)
    copied = ctx.swap_in(rig.guest.uffd, STEP)
    slots = rig.handler.swap_file.slots_of(0, PAGES)
    assert np.array_equal(slots, np.arange(PAGES)), "the file is not packed in page order"
    lo, hi = AHEAD
    resident = _resident(rig.handler.swap_file.fileno(), lo, hi - lo)
    ctx.close()
    return copied, resident


def test_swap_in_prefetches_the_file_ahead_of_the_copy(make_rig: RigFactory) -> None:
    rig = _swapped_out_rig(make_rig)
    copied, resident = _resident_ahead(rig, DEFAULT_PREFETCH_BYTES)
    assert copied == bytes_to_pages(STEP)
    lo, hi = AHEAD
    # WILLNEED is asynchronous: the reads were started, give the disk a moment.
    for _ in range(50):
        if resident >= (hi - lo) // 2:
            break
        time.sleep(0.02)
        resident = _resident(rig.handler.swap_file.fileno(), lo, hi - lo)
    assert resident >= (hi - lo) // 2, (
        f"only {resident} of {hi - lo} slots ahead of the copy are in the page cache"
    )
    assert rig.swap_in_all() == PAGES - copied
    rig.check(rig.addr(0), 3, PAGES)


def test_without_prefetch_the_window_ahead_stays_on_disk(make_rig: RigFactory) -> None:
    """The negative control: the check above can fail."""
    rig = _swapped_out_rig(make_rig)
    copied, resident = _resident_ahead(rig, 0)
    assert copied == bytes_to_pages(STEP)
    lo, hi = AHEAD
    assert resident < (hi - lo) // 10, f"{resident} of {hi - lo} slots read without prefetch"
