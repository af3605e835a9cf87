"""Guest memory on 2 MiB hugetlbfs pages, through whole vmm-swap cycles.

The kernel resolves a hugetlb fault only with a UFFDIO_COPY of the whole, aligned huge page,
refuses UFFDIO_ZEROPAGE there, and frees hugetlbfs pages only whole; so the handler works in
2 MiB pages throughout. The fixture reserves the huge pages (``/proc/sys/vm/nr_hugepages``) and
restores the old value afterwards. Each test first shows the memory really is hugetlbfs (the
handler's page size is asked of the kernel), so none can pass on small pages by accident; the
controls at the end show that a handler working in 4 KiB units, or zero-filling with ZEROPAGE,
is refused by the kernel and leaves the fault unserved.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

import numpy as np
import pytest

from huge_settings import NR_HUGEPAGES, HugeSettings, meminfo
from vmmswap.dataplane import page_handler
from vmmswap.dataplane.guest_memory import HUGETLB_2M_SIZE, Backing, GuestMemory, RegionSpec
from vmmswap.dataplane.page_handler import InvalidAddressError, PageHandler
from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE

from .agent import page_digest
from .conftest import MiB, Rig, RigFactory

pytestmark = pytest.mark.timeout(120)

HUGE = HUGETLB_2M_SIZE
SUB = HUGE // PAGE_SIZE  # 4 KiB pages in a huge page
ZERO = page_digest(bytes(PAGE_SIZE))


def hugetlb_rig(huge_settings: HugeSettings, make_rig: RigFactory, huge_pages: int,
                **kwargs: object) -> Rig:
    huge_settings.reserve_hugetlb(huge_pages)
    rig = make_rig([(0, huge_pages * HUGE)], backing="2M", **kwargs)
    assert rig.handler.page_size == HUGE, "the guest memory is not hugetlbfs"
    assert rig.guest.specs[0].host_addr % HUGE == 0
    return rig


@pytest.mark.parametrize("readahead", [False, True])
def test_hugetlb_guest_survives_enable_trim_out_faults_disable(
        huge_settings: HugeSettings, make_rig: RigFactory, readahead: bool) -> None:
    """Two whole cycles over 8 huge pages, every 4 KiB of the guest verified."""
    huge_pages = 8
    rig = hugetlb_rig(huge_settings, make_rig, huge_pages, readahead=readahead,
                      max_readahead_bytes=8 * MiB)
    pages = huge_pages * SUB
    written = 5 * SUB - 300  # ends inside huge page 4: its tail is zero
    rig.write(rig.addr(0), seed=7, pages=written)
    rig.poke(rig.addr(0, 6 * SUB), bytes(PAGE_SIZE))  # huge page 6: resident, all zero
    # Huge page 5 and 7 are never touched (holes).
    handler = rig.handler
    assert handler.resident_pages() == 6
    m = handler.metrics()
    assert (m.page_size, m.resident_pages, m.bytes_of("resident_pages")) == (HUGE, 6, 6 * HUGE)
    assert len(rig.server.faults) == 6  # one fault per huge page written

    # Enable: the five huge pages with data are staged; the zero one and the holes are not.
    assert rig.enable() == 5
    assert handler.resident_pages() == 0
    assert handler.staging_pages == 5
    ctx = rig.trim_all()
    assert (ctx.zero_pages, ctx.clean_pages) == (0, 0)
    assert rig.out_all() == 5
    assert handler.staging_pages == 0 and handler.swap_pages == 5
    assert handler.swap_file.file_bytes() == 5 * HUGE  # one 2 MiB slot per huge page

    # Faults bring back huge pages 0 and 1; disable brings back the rest.
    faults_before = len(rig.server.faults)
    assert rig.digests(rig.addr(0), 2 * SUB) == rig.expected(7, 2 * SUB)
    assert len(rig.server.faults) - faults_before == 2  # one per huge page
    # With readahead, the second fault continues the stream and fills huge page 2 as well.
    m = handler.metrics()
    assert m.copied_from_file_pages == (3 if readahead else 2)
    assert m.readahead_pages == (1 if readahead else 0)
    assert rig.swap_in_all() == (2 if readahead else 3)
    expected = rig.expected(7, written) + [ZERO] * (pages - written)
    assert rig.digests_quietly(rig.addr(0), 5 * SUB) == expected[:5 * SUB]
    assert rig.digests(rig.addr(0), pages) == expected  # pages 5-7 fault: zero-filled by COPY
    m = handler.metrics()
    assert m.zeroed_pages == 3 and m.bytes_of("zeroed_pages") == 3 * HUGE
    assert handler.resident_pages() == huge_pages

    # Second cycle: huge page 3 changes, huge page 1 becomes all zero; the others are clean.
    rig.write(rig.addr(0, 3 * SUB + 10), seed=9)
    expected[3 * SUB + 10] = rig.expected(9)[0]
    rig.write(rig.addr(0, 1 * SUB), seed=0, pages=SUB)
    expected[SUB:2 * SUB] = [ZERO] * SUB
    assert rig.enable() == 4  # 0, 2, 3, 4 hold data
    ctx = rig.trim_all()
    assert (ctx.zero_pages, ctx.clean_pages) == (0, 3)  # 0, 2 and 4 equal their file copy
    assert handler.staging_pages == 1 and handler.swap_pages == 3
    assert rig.out_all() == 1
    assert rig.digests(rig.addr(0), pages) == expected
    assert rig.swap_in_all() == 0


def test_hugetlb_staged_pages_fault_in_whole(
        huge_settings: HugeSettings, make_rig: RigFactory) -> None:
    """A fault on any 4 KiB of a staged huge page fills all 512 of them at once."""
    rig = hugetlb_rig(huge_settings, make_rig, 3)
    rig.write(rig.addr(0), seed=3, pages=3 * SUB)
    assert rig.enable() == 3
    before = len(rig.server.faults)
    assert rig.read(rig.addr(0, SUB + 200), 16) == rig.read_quietly(rig.addr(0, SUB + 200), 16)
    assert len(rig.server.faults) == before + 1
    assert rig.digests_quietly(rig.addr(0, SUB), SUB) == rig.expected(3, 2 * SUB)[SUB:]
    m = rig.handler.metrics()
    assert (m.copied_from_staging_pages, m.staging_pages) == (1, 2)
    assert rig.digests(rig.addr(0), 3 * SUB) == rig.expected(3, 3 * SUB)


def test_hugetlb_zero_pages_read_and_write_faults(
        huge_settings: HugeSettings, make_rig: RigFactory) -> None:
    """A never-written huge page faults once, read or write, and is zero-filled by a COPY of
    2 MiB of zeros (ZEROPAGE is refused on hugetlbfs)."""
    rig = hugetlb_rig(huge_settings, make_rig, 2)
    assert rig.read(rig.addr(0, 7), 8) == bytes(8)
    rig.poke(rig.addr(0, SUB + 5), b"\x01")
    m = rig.handler.metrics()
    assert (m.zeroed_pages, m.redundant_pages) == (2, 0)
    assert len(rig.server.faults) == 2
    got = rig.digests_quietly(rig.addr(0), 2 * SUB)
    assert got.count(ZERO) == 2 * SUB - 1


def test_hugetlb_discards_must_be_whole_huge_pages(
        huge_settings: HugeSettings, make_rig: RigFactory) -> None:
    """A REMOVE must cover whole huge pages: a partial one is refused and changes nothing; a
    whole one drops the staged copy, and the page reads as zeros."""
    rig = hugetlb_rig(huge_settings, make_rig, 3)
    rig.write(rig.addr(0), seed=5, pages=3 * SUB)
    assert rig.enable() == 3
    handler = rig.handler
    for start, end in ((rig.addr(0, 1), rig.addr(0, SUB)),         # starts inside a huge page
                       (rig.addr(0), rig.addr(0, SUB + 1)),         # ends inside one
                       (rig.addr(0, SUB), rig.addr(0, SUB) + 100)):  # not even 4 KiB
        with pytest.raises(InvalidAddressError, match="whole 2048 KiB pages"):
            handler.handle_remove(start, end)
    assert handler.staging_pages == 3
    rig.remove(rig.addr(0, SUB), HUGE)  # MADV_REMOVE in the VMM: the REMOVE event
    assert handler.staging_pages == 2
    expected = rig.expected(5, 3 * SUB)
    expected[SUB:2 * SUB] = [ZERO] * SUB
    assert rig.digests(rig.addr(0), 3 * SUB) == expected


def test_hugetlb_guest_memory_refuses_unaligned_regions_and_discards(
        huge_settings: HugeSettings, tmp_path: object) -> None:
    huge_settings.reserve_hugetlb(2)
    free = meminfo("HugePages_Free")
    with pytest.raises(ValueError, match="not aligned to the 2048 KiB huge page"):
        GuestMemory.create([(0, HUGE + PAGE_SIZE)], backing=Backing.HUGETLB_2M)
    with pytest.raises(ValueError, match="not aligned to the 2048 KiB huge page"):
        GuestMemory.create([(PAGE_SIZE, HUGE)], backing=Backing.HUGETLB_2M)
    assert meminfo("HugePages_Free") == free  # nothing was reserved
    with GuestMemory.create([(0, 2 * HUGE)], backing=Backing.HUGETLB_2M) as memory:
        assert memory.page_size == HUGE
        memory.write(0, b"\xaa" * (2 * HUGE))
        for addr, length in ((0, PAGE_SIZE), (PAGE_SIZE, HUGE), (HUGE, HUGE - PAGE_SIZE)):
            with pytest.raises(ValueError, match="not aligned to the 2048 KiB huge page"):
                memory.discard(addr, length)
        assert memory.read(0, 2 * HUGE) == b"\xaa" * (2 * HUGE)  # nothing discarded
        assert memory.resident_bytes() == 2 * HUGE
        memory.discard(HUGE, HUGE)
        assert memory.resident_bytes() == HUGE
        # A handler over a region cutting a huge page is refused before anything is made.
        memfd = memory.regions[0].memfd
        spec = memory.specs()[0]
        for bad in (RegionSpec(0, spec.host_addr, HUGE + PAGE_SIZE),
                    RegionSpec(PAGE_SIZE, spec.host_addr, HUGE),
                    RegionSpec(0, spec.host_addr + PAGE_SIZE, HUGE)):
            with pytest.raises(ValueError, match="not aligned to the 2048 KiB huge page"):
                PageHandler.create([(bad, memfd)], str(tmp_path))
        assert os.listdir(str(tmp_path)) == []


def test_hugetlb_region_mixed_with_small_pages_is_refused(
        huge_settings: HugeSettings, tmp_path: object) -> None:
    huge_settings.reserve_hugetlb(1)
    with GuestMemory.create([(0, HUGE)], backing=Backing.HUGETLB_2M) as huge, \
            GuestMemory.create([(HUGE, HUGE)]) as small:
        regions = [(huge.specs()[0], huge.memfds()[0]), (small.specs()[0], small.memfds()[0])]
        with pytest.raises(ValueError, match="mix page sizes"):
            PageHandler.create(regions, str(tmp_path))


# --- negative controls: the huge-page unit is what makes hugetlb faults servable -------------

@pytest.mark.parametrize("unit", ["2M", "4k"])
def test_control_a_handler_in_4k_units_cannot_serve_hugetlb(
        huge_settings: HugeSettings, make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch,
        unit: str) -> None:
    """The same staged fault, served by a handler that believes the memory has 4 KiB pages:
    its 4 KiB UFFDIO_COPY is refused (EINVAL) and the guest stays blocked; in 2 MiB units the
    fault is served. (Moving to staging is done by the real handler in both cases.)"""
    rig = hugetlb_rig(huge_settings, make_rig, 2)
    rig.write(rig.addr(0), seed=4, pages=2 * SUB)
    assert rig.enable() == 2
    if unit == "4k":
        monkeypatch.setattr(page_handler, "memfd_page_size", lambda fd: PAGE_SIZE)
        small = PageHandler.create(rig.guest.regions(), swap_file=None)
        try:
            assert small.page_size == PAGE_SIZE
            # Give it the staged data, 512 small pages per huge page.
            buf = memoryview(bytearray(2 * HUGE))
            rig.handler.staging.read(0, 2, buf)
            small.staging.write(0, buf)
            small.staging.mark_present(0, 2 * SUB)
            rig.server.handler = small
            with pytest.raises(OSError) as err:
                rig.read(rig.addr(0, 3), 8)
            assert err.value.errno == errno.EINVAL
        finally:
            rig.server.handler = rig.handler
            rig.vmm.kill()  # its thread is blocked on the unserved fault
            small.close()
    else:
        assert rig.digests(rig.addr(0), 2 * SUB) == rig.expected(4, 2 * SUB)


@pytest.mark.parametrize("fill", ["copy of zeros", "zeropage"])
def test_control_zeropage_is_refused_on_hugetlb(
        huge_settings: HugeSettings, make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch,
        fill: str) -> None:
    """A read fault on a hugetlb hole zero-filled with UFFDIO_ZEROPAGE (as on small pages) is
    refused with EINVAL; the handler's COPY of 2 MiB of zeros serves it."""
    rig = hugetlb_rig(huge_settings, make_rig, 1)
    if fill == "zeropage":
        # Make the handler take its small-page branch (ZEROPAGE for read faults).
        monkeypatch.setattr(page_handler, "PAGE_SIZE", HUGE)
        try:
            with pytest.raises(OSError) as err:
                rig.read(rig.addr(0, 1), 8)
            assert err.value.errno == errno.EINVAL
        finally:
            rig.vmm.kill()
    else:
        assert rig.read(rig.addr(0, 1), 8) == bytes(8)


def test_kernel_fact_a_partial_hugetlbfs_punch_zeroes_in_place(
        huge_settings: HugeSettings) -> None:
    """Why moves and discards punch whole huge pages: punching 4 KiB of a hugetlbfs page
    succeeds, keeps the huge page allocated (no fault would follow) and zeroes the range --
    silent loss of that data if the handler ever did it."""
    huge_settings.reserve_hugetlb(1)
    with GuestMemory.create([(0, HUGE)], backing=Backing.HUGETLB_2M) as memory:
        memory.write(0, b"\x5a" * HUGE)
        libc.fallocate(memory.regions[0].memfd,
                       libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, PAGE_SIZE,
                       PAGE_SIZE)
        assert memory.resident_bytes() == HUGE  # still there: the mapping will not fault
        assert memory.read(PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)  # but zeroed
        assert memory.read(0, PAGE_SIZE) == b"\x5a" * PAGE_SIZE


def test_swap_file_maps_consecutive_huge_slots_and_refuses_others(tmp_path: object) -> None:
    """map_pages (the in-place COPY source for huge pages) shows exactly what read_pages
    reads, and declines a run whose slots are not consecutive, so the caller reads it."""
    with SwapFile.create(str(tmp_path), 4, page_size=HUGE) as swap:
        data = np.frombuffer(os.urandom(3 * HUGE), dtype=np.uint8).copy()
        swap.write_pages(np.arange(3, dtype=np.int64), memoryview(data))
        got = swap.map_pages(0, 3)
        assert got is not None
        addr, release = got
        try:
            assert ctypes.string_at(addr, 3 * HUGE) == data.tobytes()
        finally:
            release()
        swap.free_range(1, 2)
        swap.write_pages(np.array([3], dtype=np.int64), memoryview(data[:HUGE]))
        assert (swap.slot(2), swap.slot(3)) == (2, 1)  # lowest free slot reused
        assert swap.map_pages(2, 4) is None
        assert swap.map_pages(1, 2) is None  # no slot at all
        buf = memoryview(bytearray(2 * HUGE))
        swap.read_pages(2, 4, buf)
        assert bytes(buf) == data[2 * HUGE:].tobytes() + data[:HUGE].tobytes()


@pytest.mark.parametrize("source", ["mapped", "read"])
def test_hugetlb_file_faults_mapped_or_read_serve_the_same(
        huge_settings: HugeSettings, make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch,
        source: str) -> None:
    """Faults from the swap file COPY huge pages from the mapped page cache; with the mapper
    declining, they are read through the bounce buffer; the guest sees the same either way."""
    rig = hugetlb_rig(huge_settings, make_rig, 4, readahead=True)
    rig.write(rig.addr(0), seed=6, pages=4 * SUB)
    assert rig.enable() == 4
    assert rig.out_all() == 4
    swap = rig.handler.swap_file
    calls: list[bool] = []
    real = swap.map_pages

    def counting(start: int, end: int) -> object:
        got = real(start, end) if source == "mapped" else None
        calls.append(got is not None)
        return got

    monkeypatch.setattr(rig.handler, "file_mapper", counting)
    assert rig.digests(rig.addr(0), 4 * SUB) == rig.expected(6, 4 * SUB)
    assert calls and all(calls) == (source == "mapped") and any(calls) == (source == "mapped")
    assert rig.handler.metrics().copied_from_file_pages == 4


@pytest.mark.parametrize("check", ["looked at", "control: EEXIST trusted"])
def test_hugetlb_copy_eexist_with_no_free_huge_page_keeps_the_page(
        huge_settings: HugeSettings, make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch,
        check: str) -> None:
    """With no huge page free, the kernel answers a hugetlb COPY with EEXIST for a page that
    is not there (6.18). Trusting it dropped the staged copy and the next fault was served
    zeros (found by bench_hugepages sharing the pool with the torture soak). The handler must
    keep the page staged and fail the fill (ENOMEM: the fault is retried later), then serve it
    once a page is free. The control trusts EEXIST and reproduces the lost page."""
    rig = hugetlb_rig(huge_settings, make_rig, 2)
    rig.write(rig.addr(0), seed=5, pages=2 * SUB)
    assert rig.enable() == 2  # both punched out of the guest: back in the pool
    if check.startswith("control"):
        monkeypatch.setattr(rig.handler.filler, "_exists", None)
    # No huge page free (the fixture restores the pool).
    total = int(NR_HUGEPAGES.read_text())
    free = meminfo("HugePages_Free")
    huge_settings._write(NR_HUGEPAGES, str(total - free), str(total))
    assert meminfo("HugePages_Free") == 0
    grow = threading.Timer(1.0, lambda: NR_HUGEPAGES.write_text(str(total)))
    grow.start()
    try:
        if check.startswith("control"):
            # EEXIST "settles" the page, the re-fault finds it nowhere and, once the pool
            # has a page again, is zero-filled: the guest's data is gone.
            assert rig.read(rig.addr(0, 3), 8) == bytes(8)
            assert not rig.handler.staging.present.get(0)
            return
        with pytest.raises(OSError) as err:
            rig.read(rig.addr(0, 3), 8)
        assert err.value.errno == errno.ENOMEM and "EEXIST" in str(err.value)
        assert rig.handler.staging.present.get(0), "the only copy was dropped"
        grow.join()
        # A retry of the blocked fault (the monitor retries) now fills the page.
        rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, 3))
        memfd = rig.guest.regions()[0][1]
        page = bytearray(HUGE)
        assert os.preadv(memfd, [page], 0) == HUGE
        got = [page_digest(bytes(page[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])) for i in range(SUB)]
        assert got == rig.expected(5, SUB)
    finally:
        grow.join()
        rig.vmm.kill()  # its read was answered outside the request, or never
