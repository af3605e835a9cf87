"""Trim (zero and clean pages) and swap-in, with real faults."""

from __future__ import annotations

import os
import time

import pytest

from vmmswap.dataplane.guest_memory import data_ranges
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE

from .conftest import RigFactory

pytestmark = pytest.mark.timeout(120)
P = PAGE_SIZE


@pytest.fixture(params=[False, True], ids=["staging-read", "staging-mapped"])
def prepared(request: pytest.FixtureRequest) -> bool:
    """Both ways staging is read: with ``preadv`` (a staging no enable prepared: a successor
    monitor's, or hugetlbfs) and in place through the mapping a prepared enable leaves."""
    return bool(request.param)


def test_trim_drops_zero_pages(make_rig: RigFactory, prepared: bool) -> None:
    rig = make_rig(prepared=prepared)
    rig.write(rig.addr(0, 0), seed=1, pages=4)
    rig.write(rig.addr(0, 4), seed=0, pages=6)  # written, but all zero
    rig.enable()
    assert rig.handler.staging_pages == 10
    ctx = rig.trim_all()
    assert (ctx.zero_pages, ctx.clean_pages) == (6, 0)
    assert rig.handler.staging_pages == 4
    assert rig.digests(rig.addr(0), 10) == [*rig.expected(1, 4), *rig.expected(0, 6)]
    m = rig.handler.metrics()
    assert m.zeroed_pages == 6 and m.copied_from_staging_pages == 4


def test_trim_drops_clean_pages_and_frees_zero_slots(make_rig: RigFactory, prepared: bool) -> None:
    rig = make_rig(prepared=prepared)
    rig.write(rig.addr(0, 0), seed=1, pages=12)
    rig.enable()
    rig.out_all()
    assert rig.handler.swap_pages == 12
    rig.check(rig.addr(0), 1, 12)  # all back from the file; slots keep stale copies
    rig.write(rig.addr(0, 3), seed=5)  # changed: must be written again
    rig.poke(rig.addr(0, 4), bytes(P))  # now all zero: its slot can go
    rig.enable()
    assert rig.handler.staging_pages == 12 and rig.handler.swap_pages == 0
    ctx = rig.trim_all(max_pages=5)
    assert (ctx.zero_pages, ctx.clean_pages) == (1, 10)
    assert rig.handler.staging_pages == 1  # page 3
    assert rig.handler.swap_pages == 10
    assert rig.handler.swap_file.used_slots == 11
    assert rig.out_all() == 1
    expected = rig.expected(1, 12)
    expected[3] = rig.expected(5)[0]
    expected[4] = rig.expected(0)[0]
    assert rig.digests(rig.addr(0), 12) == expected


def test_trim_is_resumable_and_sees_faults_in_between(make_rig: RigFactory, prepared: bool) -> None:
    rig = make_rig(prepared=prepared)
    rig.write(rig.addr(0, 0), seed=0, pages=20)
    rig.enable()
    ctx = rig.handler.start_trim()
    assert ctx.trim_pages(8) == 8
    rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, 15))  # leaves staging
    steps = []
    while (n := ctx.trim_pages(8)) is not None:
        steps.append(n)
    assert sum(steps) == 11 and ctx.zero_pages == 19
    assert ctx.trim_pages(8) is None
    assert rig.handler.staging_pages == 0


def test_swap_in_brings_everything_back_without_faults(make_rig: RigFactory,
                                                       prepared: bool) -> None:
    rig = make_rig([(0, 64 * P), (1 << 30, 32 * P)], prepared=prepared)
    rig.write(rig.addr(0, 0), seed=1, pages=40)
    rig.write(rig.addr(1, 5), seed=2, pages=20)
    rig.enable()
    rig.handler.swap_out(16 * P)
    rig.handler.swap_out(16 * P)  # 32 in the file, 28 staged
    assert (rig.handler.swap_pages, rig.handler.staging_pages) == (32, 28)
    assert rig.swap_in_all(max_bytes=8 * P) == 60
    m = rig.handler.metrics()
    assert (m.staging_pages, m.swap_pages, m.resident_pages) == (0, 0, 60)
    # No fault at all: the pages are there.
    assert rig.digests_quietly(rig.addr(0, 0), 40) == rig.expected(1, 40)
    assert rig.digests_quietly(rig.addr(1, 5), 20) == rig.expected(2, 20)
    assert rig.handler.metrics().zeroed_pages == 0
    # The disk copies stay for a later trim.
    assert rig.handler.swap_file.used_slots == 32


def test_swap_in_skips_pages_already_present_and_is_resumable(make_rig: RigFactory,
                                                              prepared: bool) -> None:
    rig = make_rig(prepared=prepared)
    rig.write(rig.addr(0, 0), seed=1, pages=30)
    rig.enable()
    rig.out_all()
    ctx = rig.handler.start_swap_in()
    assert ctx.swap_in(rig.guest.uffd, 4 * P) == 4
    rig.write(rig.addr(0, 10), seed=9)  # faulted in (and changed) between chunks
    other = b"\x11" * P
    rig.guest.uffd.copy(rig.addr(0, 20), P, other)  # filled behind the handler's back
    total = 4
    while (n := ctx.swap_in(rig.guest.uffd, 4 * P)) > 0:
        total += n
    ctx.close()
    assert total == 29  # page 10 was already served by its fault; page 20 existed
    assert rig.handler.swap_pages == 0
    digests = rig.digests(rig.addr(0), 30)
    assert digests[10] == rig.expected(9)[0]
    assert digests[:10] == rig.expected(1, 10)
    assert digests[21:] == rig.expected(1, 30)[21:]
    with pytest.raises(ValueError, match="closed"):
        ctx.swap_in(rig.guest.uffd)


def test_swap_in_restarts_after_a_new_enable(make_rig: RigFactory, prepared: bool) -> None:
    rig = make_rig(prepared=prepared)
    rig.write(rig.addr(0, 0), seed=1, pages=8)
    rig.enable()
    ctx = rig.handler.start_swap_in()
    assert ctx.swap_in(rig.guest.uffd, 8 * P) == 8
    rig.write(rig.addr(0, 0), seed=3)  # resident again
    rig.enable()  # page 0 back in staging, behind the cursor
    assert ctx.swap_in(rig.guest.uffd, 8 * P) == 8
    assert rig.handler.staging_pages == 0
    assert rig.read_quietly(rig.addr(0, 0), P) != bytes(P)


def test_resident_pages_follow_seek_data(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 4 << 20)])
    rig.write(rig.addr(0, 100), seed=1, pages=3)
    assert rig.handler.metrics().resident_pages == 3
    assert sum(e - s for s, e in data_ranges(rig.guest.memfds[0], 4 << 20)) == 3 * P


def test_swap_out_read_ahead_skips_pages_that_left_staging(make_rig: RigFactory) -> None:
    """Chunk k+1 is read while chunk k is written; faults, REMOVE and enable in between must
    not let a stale read-ahead copy reach the file."""
    rig = make_rig()
    rig.write(rig.addr(0, 0), seed=1, pages=48)
    rig.enable()
    assert rig.handler.swap_out(8 * P) == 8  # writes 0-7, reads 8-15 ahead
    rig.write(rig.addr(0, 9), seed=2)  # page 9 leaves staging and changes
    rig.remove(rig.addr(0, 11), P)  # page 11 is given back
    assert rig.handler.swap_out(8 * P) == 6  # 8-15 without 9 and 11; reads 16-23 ahead
    rig.write(rig.addr(0, 17), seed=3)
    rig.enable()  # page 17 staged again with new data: the read-ahead is stale
    assert rig.out_all(8 * P) == 33  # 16-47 and page 9
    expected = rig.expected(1, 48)
    expected[9] = rig.expected(2)[0]
    expected[11] = rig.expected(0)[0]
    expected[17] = rig.expected(3)[0]
    assert rig.handler.staging_pages == 0
    assert rig.digests(rig.addr(0), 48) == expected


def test_swap_in_across_a_vma_split_of_the_region(make_rig: RigFactory, prepared: bool) -> None:
    """A swap-in chunk must not span two VMAs of the VMM's mapping of one region."""
    rig = make_rig([(0, 64 * P)], prepared=prepared)
    rig.write(rig.addr(0), seed=4, pages=64)
    rig.vmm.request({"op": "remove", "addr": rig.addr(0, 21), "length": 10 * P,
                     "advice": libc.MADV_DONTFORK}, rig.server)  # three VMAs now
    rig.enable()
    rig.out_all(16 * P)
    rig.enable()  # nothing resident: no-op
    assert rig.swap_in_all() == 64
    assert rig.digests_quietly(rig.addr(0), 64) == rig.expected(4, 64)


def test_swap_out_frees_staging_once_it_is_empty(make_rig: RigFactory, prepared: bool) -> None:
    """Swap-out frees staging in big batches; the last one, far below the batch size here, is
    freed as soon as staging is empty, not left for the next enable's flush."""
    rig = make_rig(prepared=prepared)
    rig.write(rig.addr(0, 0), seed=3, pages=40)
    rig.enable()
    fd = rig.handler.staging.fileno()
    assert os.fstat(fd).st_blocks * 512 >= 40 * P
    assert rig.out_all() == 40
    deadline = time.monotonic() + 10
    while os.fstat(fd).st_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.fstat(fd).st_blocks == 0
    rig.check(rig.addr(0), 3, 40)
