"""PageHandler with real faults: crosvm's page-handler behaviours.

A child process (the agent) owns guest memory and its uffd; this process registers the regions
on that uffd, runs the handler and serves every fault the child's accesses cause.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmmswap.dataplane.guest_memory import RegionOverlapError, RegionSpec, data_ranges
from vmmswap.dataplane.page_handler import InvalidAddressError, PageHandler
from vmmswap.uffd.pagesize import PAGE_SIZE

from .conftest import MiB, Rig, RigFactory
from .harness import FaultServer, Vmm

pytestmark = pytest.mark.timeout(120)

P = PAGE_SIZE


# --- creation -------------------------------------------------------------------------------------
def memfds(n: int, size: int) -> list[int]:
    fds = []
    for _ in range(n):
        fd = os.memfd_create("t", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        fds.append(fd)
    return fds


@pytest.mark.parametrize(("a", "b"), [
    ((0x10000, 0x4000), (0x10000, 0x4000)),  # identical
    ((0x10000, 0x4000), (0x11000, 0x1000)),  # contains
    ((0x11000, 0x1000), (0x10000, 0x4000)),  # contained
    ((0x10000, 0x4000), (0x13000, 0x4000)),  # overlaps the end
    ((0x13000, 0x4000), (0x10000, 0x4000)),  # overlaps the start
])
def test_overlapping_regions_are_rejected_naming_both(tmp_path: Path, a: tuple[int, int],
                                                      b: tuple[int, int]) -> None:
    fds = memfds(2, 0x4000)
    regions = [(RegionSpec(0x100000 * i, addr, size), fd)
               for i, ((addr, size), fd) in enumerate(zip((a, b), fds, strict=True))]
    with pytest.raises(RegionOverlapError) as info:
        PageHandler.create(regions, tmp_path)
    for addr, size in (a, b):
        assert f"{addr:#x}, {addr + size:#x})" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    for fd in fds:
        os.close(fd)


def test_adjacent_regions_are_fine(tmp_path: Path) -> None:
    fds = memfds(2, 0x4000)
    regions = [(RegionSpec(0, 0x10000, 0x4000), fds[0]), (RegionSpec(0x4000, 0x14000, 0x4000),
                                                         fds[1])]
    with PageHandler.create(regions, tmp_path) as handler:
        assert handler.num_pages == 8
        assert handler.region_at(0x14000).base_page == 4
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("spec", [RegionSpec(0, 0x10001, 0x4000), RegionSpec(0, 0x10000, 0x4001),
                                  RegionSpec(0, 0x10000, 0)])
def test_unaligned_or_empty_regions_are_rejected(tmp_path: Path, spec: RegionSpec) -> None:
    (fd,) = memfds(1, 0x8000)
    with pytest.raises(ValueError):
        PageHandler.create([(spec, fd)], tmp_path)
    os.close(fd)


def test_region_bigger_than_its_memfd_is_rejected(tmp_path: Path) -> None:
    (fd,) = memfds(1, 0x1000)
    with pytest.raises(ValueError, match="holds 0x1000"):
        PageHandler.create([(RegionSpec(0, 0x10000, 0x2000), fd)], tmp_path)
    os.close(fd)


def test_close_leaves_the_memfds_open(tmp_path: Path) -> None:
    (fd,) = memfds(1, 0x4000)
    handler = PageHandler.create([(RegionSpec(0, 0x10000, 0x4000), fd)], tmp_path)
    handler.close()
    handler.close()
    os.fstat(fd)
    os.close(fd)


# --- invalid addresses ----------------------------------------------------------------------------
def test_fault_outside_every_region_is_invalid(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 16 * P), (1 << 20, 16 * P)])
    regions = rig.handler.regions
    outside = [0, regions[0].host_addr - 1, regions[-1].host_end, regions[-1].host_end + 5 * P]
    for addr in outside:
        with pytest.raises(InvalidAddressError, match="the address is invalid"):
            rig.handler.handle_page_fault(rig.guest.uffd, addr)


def test_remove_with_bad_ranges_changes_nothing(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 16 * P)])
    rig.write(rig.addr(0), seed=3, pages=4)
    rig.enable()
    for start, end in ((rig.addr(0) + 1, rig.addr(0, 2)), (rig.addr(0), rig.addr(0, 2) + 8),
                       (rig.addr(0, 2), rig.addr(0, 1)), (rig.addr(0, 12), rig.addr(0, 20))):
        with pytest.raises(InvalidAddressError):
            rig.handler.handle_remove(start, end)
    assert rig.handler.staging_pages == 4
    rig.check(rig.addr(0), seed=3, pages=4)


# --- faults ---------------------------------------------------------------------------------------
def test_untouched_pages_read_and_write_as_zero(make_rig: RigFactory) -> None:
    rig = make_rig()
    assert rig.read(rig.addr(0, 5), 16) == bytes(16)
    rig.poke(rig.addr(0, 6) + 100, b"hello")
    assert rig.read(rig.addr(0, 6) + 98, 9) == b"\0\0hello\0\0"
    m = rig.handler.metrics()
    assert m.zeroed_pages == 2 and m.redundant_pages == 0 and m.resident_pages == 2


def test_duplicated_fault_is_redundant(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.write(rig.addr(0, 1), seed=9)
    rig.enable()
    addr = rig.addr(0, 1)
    rig.handler.handle_page_fault(rig.guest.uffd, addr)  # served from staging
    rig.handler.handle_page_fault(rig.guest.uffd, addr + 123)  # the same page again
    m = rig.handler.metrics()
    assert m.copied_from_staging_pages == 1 and m.redundant_pages == 1 and m.zeroed_pages == 0
    rig.check(addr, seed=9)
    # Duplicated zero-page faults too.
    rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, 7))
    rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, 7), write=True)
    m = rig.handler.metrics()
    assert m.zeroed_pages == 1 and m.redundant_pages == 2


def test_threads_faulting_the_same_page(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.write(rig.addr(0, 2), seed=4)
    rig.enable()
    before = len(rig.server.faults)
    reply = rig.vmm.request({"op": "threads_read", "addr": rig.addr(0, 2), "threads": 6},
                            rig.server)
    faults = len(rig.server.faults) - before
    expected = rig.read(rig.addr(0, 2), 8).hex()
    assert reply["data"] == [expected] * 6
    m = rig.handler.metrics()
    assert faults >= 1
    assert m.copied_from_staging_pages == 1
    assert m.redundant_pages == faults - 1


def test_move_with_data_across_regions(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 64 * P), (1 << 30, 64 * P)])
    rig.write(rig.addr(0, 0), seed=1, pages=10)
    rig.write(rig.addr(0, 30), seed=2, pages=3)
    rig.write(rig.addr(1, 63), seed=3)
    assert rig.handler.metrics().resident_pages == 14
    assert rig.enable() == 14
    m = rig.handler.metrics()
    assert (m.resident_pages, m.staging_pages, m.zeroed_pages) == (0, 14, 0)
    rig.check(rig.addr(0, 0), 1, 10)
    rig.check(rig.addr(0, 30), 2, 3)
    rig.check(rig.addr(1, 63), 3)
    assert rig.read(rig.addr(0, 20), 8) == bytes(8)  # a hole stays a hole: zero page
    m = rig.handler.metrics()
    assert m.copied_from_staging_pages == 14 and m.zeroed_pages == 1 and m.staging_pages == 0


def test_enable_twice_keeps_staged_pages(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.write(rig.addr(0, 0), seed=1, pages=4)
    rig.enable()
    rig.write(rig.addr(0, 1), seed=8)  # faults page 1 back in and overwrites it
    assert rig.enable() == 1
    assert rig.handler.staging_pages == 4
    assert rig.digests(rig.addr(0, 0), 4) == [
        *rig.expected(1, 1), *rig.expected(8, 1), *rig.expected(1, 4)[2:]]


def test_remove_event_drops_staged_and_swapped_copies(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.write(rig.addr(0, 0), seed=5, pages=16)
    rig.enable()
    rig.handler.swap_out(8 * P)  # pages 0-7 to the file, 8-15 stay staged
    assert (rig.handler.swap_pages, rig.handler.staging_pages) == (8, 8)
    rig.remove(rig.addr(0, 4), 8 * P)  # the balloon takes pages 4-11
    assert rig.server.removes == [(rig.addr(0, 4), rig.addr(0, 12))]
    assert (rig.handler.swap_pages, rig.handler.staging_pages) == (4, 4)
    assert rig.handler.swap_file.used_slots == 4
    assert rig.digests(rig.addr(0, 0), 16) == [
        *rig.expected(5, 4), *[rig.expected(0)[0]] * 8, *rig.expected(5, 16)[12:]]
    assert rig.handler.metrics().zeroed_pages == 8


def test_huge_aligned_move_of_a_large_region(make_rig: RigFactory) -> None:
    size = 8 * MiB
    rig = make_rig([(0, size)])
    rig.vmm.request({"op": "fill", "addr": rig.addr(0, 1), "length": size - 3 * P}, rig.server)
    moved = rig.enable()
    assert moved == size // P - 3
    assert list(data_ranges(rig.guest.memfds[0], size)) == []
    reply = rig.vmm.request({"op": "digests", "addr": rig.addr(0), "pages": size // P},
                            rig.server)
    assert reply["digests"][0] == rig.expected(0)[0]
    assert len(set(reply["digests"])) == size // P - 2  # two zero pages, the rest distinct


# --- swap out -------------------------------------------------------------------------------------
def test_swap_out_once(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 64 * P), (1 << 30, 8 * P)])
    rig.write(rig.addr(0, 3), seed=6, pages=20)
    rig.write(rig.addr(1, 0), seed=7, pages=8)
    rig.enable()
    assert rig.out_all(max_bytes=4 * P) == 28
    assert rig.handler.swap_out() == 0
    m = rig.handler.metrics()
    assert (m.staging_pages, m.swap_pages, m.resident_pages) == (0, 28, 0)
    assert os.fstat(rig.handler.swap_file.fileno()).st_size == 28 * P
    rig.check(rig.addr(0, 3), 6, 20)
    rig.check(rig.addr(1, 0), 7, 8)
    m = rig.handler.metrics()
    assert m.copied_from_file_pages == 28 and m.swap_pages == 0


def test_swap_out_twice_reuses_slots(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.write(rig.addr(0, 0), seed=1, pages=32)
    rig.enable()
    rig.out_all()
    rig.write(rig.addr(0, 4), seed=2, pages=4)  # fault 4 pages back and change them
    rig.enable()
    assert rig.handler.staging_pages == 4
    assert rig.out_all() == 4
    assert rig.handler.swap_file.file_pages == 32  # rewritten in their old slots
    assert rig.handler.swap_pages == 32
    assert rig.digests(rig.addr(0, 0), 32) == [
        *rig.expected(1, 4), *rig.expected(2, 4), *rig.expected(1, 32)[8:]]


def test_page_faulted_in_before_swap_out_is_not_written(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.write(rig.addr(0, 0), seed=3, pages=8)
    rig.enable()
    rig.handler.handle_page_fault(rig.guest.uffd, rig.addr(0, 2))
    assert rig.out_all() == 7
    assert rig.handler.swap_file.slot(2) == -1
    assert rig.digests(rig.addr(0, 0), 8) == rig.expected(3, 8)
    m = rig.handler.metrics()
    assert m.copied_from_staging_pages == 1 and m.copied_from_file_pages == 7


def test_failed_swap_out_loses_nothing(make_rig: RigFactory,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig()
    rig.write(rig.addr(0, 0), seed=4, pages=8)
    rig.enable()

    def eio(*_args: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pwrite", eio)
    monkeypatch.setattr(os, "pwritev", eio)   # the path straight from the staging mapping
    with pytest.raises(OSError, match="Input/output"):
        rig.handler.swap_out()
    assert (rig.handler.staging_pages, rig.handler.swap_pages) == (8, 0)
    monkeypatch.undo()
    assert rig.out_all() == 8
    rig.check(rig.addr(0, 0), 4, 8)


def test_swap_out_to_a_full_file_system(vmm: Vmm, tmp_path: Path) -> None:
    """ENOSPC for real, on a tiny tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "none", str(mnt)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        guest = vmm.new_guest([(0, 64 * P)])
        handler = PageHandler.create(guest.regions(), mnt)
        server = FaultServer(handler, guest.uffd)
        vmm.request({"op": "write", "addr": guest.addr(0, 0), "seed": 2, "pages": 40}, server)
        handler.move_to_staging()
        with pytest.raises(OSError) as info:
            while handler.swap_out(8 * P):
                pass
        assert info.value.errno == 28
        assert handler.staging_pages + handler.swap_pages == 40
        reply = vmm.request({"op": "digests", "addr": guest.addr(0, 0), "pages": 40}, server)
        assert reply["digests"] == Rig.expected(2, 40)
        handler.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
