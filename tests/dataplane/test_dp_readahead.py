"""Readahead: the window policy, and real faults (sequential, random, region edges, holes,
pages that already exist)."""

from __future__ import annotations

import random

import pytest

from vmmswap.dataplane.readahead import DOWN, UP, Readahead
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE

from .agent import page_digest
from .conftest import MiB, RigFactory

pytestmark = pytest.mark.timeout(120)
P = PAGE_SIZE


# --- the policy -----------------------------------------------------------------------------------
def test_window_doubles_on_a_stream_up_to_the_cap() -> None:
    ra = Readahead(16)
    page, windows = 100, []
    for _ in range(7):
        w, direction = ra.window(page)
        assert direction == UP
        windows.append(w)
        ra.record(page, page + w, w)
        page += w
    assert windows == [1, 2, 4, 8, 16, 16, 16]
    assert ra.faults_avoided == 1 + 3 + 7 + 15 + 15


def test_descending_stream() -> None:
    ra = Readahead(64)
    page, windows = 10_000, []
    for _ in range(5):
        w, direction = ra.window(page)
        windows.append(w)
        first = page - w + 1
        ra.record(first, page + 1, w)
        page = first - 1
        if len(windows) > 1:
            assert direction == DOWN
    assert windows == [1, 2, 4, 8, 16]


def test_memmove_backwards_chunk_by_chunk() -> None:
    """Head, tail, tail-1, ... then the next chunk's head continues upwards."""
    ra = Readahead(512)
    chunk = 256
    faults = 0
    filled: set[int] = set()
    for base in range(0, 16 * chunk, chunk):
        for page in [base, *range(base + chunk - 1, base, -1)]:
            if page in filled:
                continue
            faults += 1
            w, direction = ra.window(page)
            if direction == UP:
                run = [p for p in range(page, page + w) if p not in filled]
                run = run[:next((i for i, p in enumerate(run) if p != page + i), len(run))]
            else:
                run = list(range(page - w + 1, page + 1))
                run = [p for p in run if p >= 0]
                while run and run[0] in filled:
                    run.pop(0)
            filled.update(run)
            ra.record(run[0], run[-1] + 1, w)
    assert len(filled) == 16 * chunk
    assert faults <= 20  # one page per fault would be 4096


def test_random_faults_get_one_page() -> None:
    ra = Readahead(512)
    rng = random.Random(3)
    for _ in range(200):
        page = rng.randrange(1 << 20)
        w, _direction = ra.window(page)
        assert w == 1
        ra.record(page, page + 1, w)
    assert ra.faults_avoided == 0


def test_interleaved_streams_keep_their_windows() -> None:
    ra = Readahead(64)
    pos = {"a": 0, "b": 10_000}
    for _ in range(5):
        for name in ("a", "b"):
            w, _ = ra.window(pos[name])
            ra.record(pos[name], pos[name] + w, w)
            pos[name] += w
        w, _ = ra.window(777_777)  # a random fault in between
        ra.record(777_777, 777_778, w)
    assert ra.window(pos["a"]) == (32, UP)


def test_short_fill_still_continues_the_stream() -> None:
    ra = Readahead(64)
    w, _ = ra.window(0)
    ra.record(0, 1, w)
    w, _ = ra.window(1)
    assert w == 2
    ra.record(1, 2, w)  # the source ran out after one page
    assert ra.window(2) == (4, UP)


# --- real faults ----------------------------------------------------------------------------------
def test_sequential_read_from_staging_uses_few_faults(make_rig: RigFactory) -> None:
    pages = 2048  # 8 MiB
    rig = make_rig([(0, pages * P)], readahead=True, max_readahead_bytes=MiB)
    rig.vmm.request({"op": "fill", "addr": rig.addr(0), "length": pages * P}, rig.server)
    rig.enable()
    before = len(rig.server.faults)
    rig.seq_read(rig.addr(0), pages * P)
    faults = len(rig.server.faults) - before
    m = rig.handler.metrics()
    assert m.copied_from_staging_pages == pages and m.staging_pages == 0
    # 1, 2, 4, ..., 256 pages, then 256 pages (1 MiB) per fault.
    assert faults <= 24  # one page per fault would be 2048
    assert m.readahead_pages == pages - faults
    assert m.faults_avoided >= pages - 2 * faults - 256


def test_sequential_read_from_the_file(make_rig: RigFactory) -> None:
    pages = 1024
    rig = make_rig([(0, pages * P)], readahead=True)
    rig.write(rig.addr(0), seed=11, pages=pages)
    rig.enable()
    rig.out_all()
    before = len(rig.server.faults)
    rig.check(rig.addr(0), 11, pages)
    assert len(rig.server.faults) - before <= 12
    m = rig.handler.metrics()
    assert m.copied_from_file_pages == pages and m.swap_pages == 0


def test_descending_read_grows_a_window_downwards(make_rig: RigFactory) -> None:
    pages = 1024
    rig = make_rig([(0, pages * P)], readahead=True)
    rig.vmm.request({"op": "fill", "addr": rig.addr(0), "length": pages * P}, rig.server)
    rig.enable()
    before = len(rig.server.faults)
    rig.vmm.request({"op": "reverse_read", "addr": rig.addr(0), "pages": pages}, rig.server)
    faults = len(rig.server.faults) - before
    assert faults <= 12
    m = rig.handler.metrics()
    assert m.copied_from_staging_pages == pages and m.readahead_pages == pages - faults


def test_random_faults_fill_one_page_each(make_rig: RigFactory) -> None:
    pages = 256
    rig = make_rig([(0, pages * P)], readahead=True)
    rig.vmm.request({"op": "fill", "addr": rig.addr(0), "length": pages * P}, rig.server)
    rig.enable()
    before = len(rig.server.faults)
    rig.vmm.request({"op": "random_read", "addr": rig.addr(0), "pages": pages, "count": 100,
                     "seed": 5}, rig.server)
    faults = len(rig.server.faults) - before
    m = rig.handler.metrics()
    # An occasional random hit next to the previous fault grows a window; mostly 1 page.
    assert faults >= 90
    assert m.copied_from_staging_pages == faults + m.readahead_pages
    assert m.readahead_pages <= 20


def test_readahead_stops_at_the_region_end(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 64 * P), (64 * P, 64 * P)], readahead=True)
    # Make the regions adjacent in page-index space and fill both completely.
    for region in (0, 1):
        rig.write(rig.addr(region), seed=20 + region, pages=64)
    rig.enable()
    rig.check(rig.addr(0), 20, 64)
    # Region 1 was not touched by region 0's readahead.
    assert rig.handler.staging_pages == 64
    rig.check(rig.addr(1), 21, 64)
    assert rig.handler.staging_pages == 0


def test_readahead_stops_at_a_hole(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 64 * P)], readahead=True)
    rig.write(rig.addr(0, 0), seed=1, pages=10)
    rig.write(rig.addr(0, 11), seed=2, pages=20)  # page 10 is a hole
    rig.enable()
    before = len(rig.server.faults)
    digests = rig.digests(rig.addr(0), 31)
    assert digests == [*rig.expected(1, 10), *rig.expected(0), *rig.expected(2, 20)]
    faulted = {f.address for f in rig.server.faults[before:]}
    assert rig.addr(0, 10) in faulted  # the hole was never filled ahead: it faulted itself
    m = rig.handler.metrics()
    assert m.zeroed_pages == 1 and m.copied_from_staging_pages == 30


def test_readahead_does_not_mix_sources(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 64 * P)], readahead=True)
    rig.write(rig.addr(0, 0), seed=1, pages=32)
    rig.enable()
    rig.handler.swap_out(16 * P)  # pages 0-15 to the file, 16-31 stay staged
    rig.check(rig.addr(0), 1, 32)
    m = rig.handler.metrics()
    assert m.copied_from_file_pages == 16 and m.copied_from_staging_pages == 16
    assert any(f.address == rig.addr(0, 16) for f in rig.server.faults)


def test_readahead_into_a_page_that_already_exists(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 64 * P)], readahead=True)
    rig.write(rig.addr(0, 0), seed=1, pages=16)
    rig.enable()
    # Another process's uffd (simulated: a COPY the handler does not know about) fills page 5.
    other = b"\xab" * P
    rig.guest.uffd.copy(rig.addr(0, 5), P, other)
    for page in (0, 1, 3):  # a stream: windows 1, 2, 4; the third reaches over page 5
        rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, page))
    assert rig.handler.metrics().copied_from_staging_pages == 6  # 0, 1-2, 3-4 and 6
    assert not rig.handler.staging.present.get(5)  # dropped: the guest's page wins
    digests = rig.digests(rig.addr(0), 16)
    assert digests[5] == page_digest(other)
    assert digests[:5] == rig.expected(1, 5) and digests[6:] == rig.expected(1, 16)[6:]
    m = rig.handler.metrics()
    assert m.copied_from_staging_pages == 15 and m.redundant_pages == 0


def test_fault_on_a_page_filled_by_readahead_of_another_uffd_is_redundant(
        make_rig: RigFactory) -> None:
    rig = make_rig([(0, 64 * P)], readahead=True)
    rig.write(rig.addr(0, 0), seed=1, pages=8)
    rig.enable()
    rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, 0))
    rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, 1))  # fills 1 and 2
    rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, 2))  # a late duplicate
    m = rig.handler.metrics()
    assert m.redundant_pages == 1 and m.copied_from_staging_pages == 3
    rig.check(rig.addr(0), 1, 8)


def test_window_is_capped(make_rig: RigFactory) -> None:
    pages = 1024
    rig = make_rig([(0, pages * P)], readahead=True, max_readahead_bytes=16 * P)
    rig.write(rig.addr(0), seed=3, pages=pages)
    rig.enable()
    before = len(rig.server.faults)
    rig.seq_read(rig.addr(0), pages * P)
    faults = len(rig.server.faults) - before
    assert faults >= pages // 16
    assert rig.handler.metrics().copied_from_staging_pages == pages


def test_readahead_across_a_vma_split_of_the_region(make_rig: RigFactory) -> None:
    """The VMM's mapping of one region may be split into several VMAs (madvise, mprotect); a
    COPY must not span two of them, so readahead falls back to the faulting page."""
    pages = 64
    rig = make_rig([(0, pages * P)], readahead=True)
    rig.write(rig.addr(0), seed=9, pages=pages)
    # MADV_DONTFORK on the upper half splits the VMA (uffd registration stays on both parts).
    rig.vmm.request({"op": "remove", "addr": rig.addr(0, 32), "length": 32 * P,
                     "advice": libc.MADV_DONTFORK}, rig.server)
    rig.enable()
    rig.check(rig.addr(0), 9, pages)
    assert rig.handler.staging_pages == 0
