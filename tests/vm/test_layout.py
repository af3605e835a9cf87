"""Guest memory map: region split, linear data offsets, page tables, GDT and TSS."""

from __future__ import annotations

import struct

import pytest

from vmmswap.kernel import kvm as k
from vmmswap.vm import layout as lay
from vmmswap.vm import longmode

MIB = 1 << 20
GIB = 1 << 30


def test_two_regions_split_data_evenly() -> None:
    guest = lay.GuestLayout.for_size(1 * GIB)
    assert guest.regions == ((0, 512 * MIB), (4 * GIB, 512 * MIB))
    assert guest.data_size == 1 * GIB - lay.SYSTEM_SIZE
    assert guest.map_limit == 4 * GIB + 512 * MIB


def test_one_region() -> None:
    guest = lay.GuestLayout.for_size(64 * MIB, regions=1)
    assert guest.regions == ((0, 64 * MIB),)
    assert guest.data_ranges == ((lay.SYSTEM_SIZE, 62 * MIB),)


@pytest.mark.parametrize("size", [0, 3 * MIB, 2 * MIB, 5 * MIB + 4096])
def test_bad_sizes_rejected(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 2 MiB"):
        lay.GuestLayout.for_size(size)


def test_one_region_above_3gib_rejected() -> None:
    with pytest.raises(ValueError, match="below 3 GiB"):
        lay.GuestLayout.for_size(4 * GIB, regions=1)


def test_span_crosses_the_gap() -> None:
    guest = lay.GuestLayout.for_size(64 * MIB)
    low_data = guest.data_ranges[0][1]
    pieces = guest.span(low_data - 8192, 16384)
    assert pieces == [(lay.SYSTEM_SIZE + low_data - 8192, 8192), (4 * GIB, 8192)]
    assert guest.data_offset(4 * GIB + 4096) == low_data + 4096


@pytest.mark.parametrize(("offset", "length"), [(0, 0), (1, 4096), (0, 4095), (0, 1 << 40)])
def test_span_rejects_bad_ranges(offset: int, length: int) -> None:
    guest = lay.GuestLayout.for_size(64 * MIB)
    with pytest.raises(ValueError):
        guest.span(offset, length)


def test_stacks_stay_in_the_system_area() -> None:
    last = lay.MAX_VCPUS - 1
    assert lay.user_stack_top(last) == lay.SYSTEM_SIZE
    assert lay.kernel_stack_top(0) == lay.STACKS_BASE + lay.KERNEL_STACK_SIZE
    with pytest.raises(ValueError):
        lay.user_stack_top(lay.MAX_VCPUS)


def test_tss_area_fits() -> None:
    assert lay.TSS_ADDR + lay.MAX_VCPUS * longmode.TSS_SIZE <= lay.PAGE_TABLES_ADDR


def test_identity_page_tables_map_2mib_pages() -> None:
    base = 0x10000
    raw = longmode.build_identity_page_tables(base, 5 * GIB, user=True)
    qwords = struct.unpack(f"<{len(raw) // 8}Q", raw)
    assert len(raw) == longmode.page_table_bytes(5 * GIB)
    pml4, pdpt = qwords[:512], qwords[512:1024]
    assert pml4[0] & ~0xFFF == base + 4096 and pml4[0] & k.X86_PTE_USER
    assert [e & ~0xFFF for e in pdpt[:5]] == [base + 8192 + i * 4096 for i in range(5)]
    pd4 = qwords[1024 + 4 * 512:1024 + 5 * 512]
    assert pd4[1] & ~0xFFF == 4 * GIB + 2 * MIB
    assert pd4[1] & k.X86_PTE_HUGE


def test_page_tables_reject_unaligned_base() -> None:
    with pytest.raises(ValueError):
        longmode.build_identity_page_tables(0x10001, GIB)


def test_gdt_has_user_segments_and_tss() -> None:
    raw = longmode.build_gdt([0x2000])
    assert len(raw) == longmode.TSS_SELECTOR_BASE + 16
    user_code = struct.unpack_from("<Q", raw, longmode.USER_CODE_SELECTOR & ~3)[0]
    assert (user_code >> 45) & 3 == 3  # DPL 3
    assert (user_code >> 53) & 1 == 1  # L: 64-bit
    tss_low = struct.unpack_from("<Q", raw, longmode.TSS_SELECTOR_BASE)[0]
    assert (tss_low >> 16) & 0xFFFFFF == 0x2000
    assert tss_low & 0xFFFF == longmode.TSS_SIZE - 1


def test_tss_io_bitmap_allows_workload_ports() -> None:
    tss = longmode.build_tss(0x141000)
    assert struct.unpack_from("<Q", tss, 4)[0] == 0x141000
    io_base = struct.unpack_from("<H", tss, 102)[0]
    assert tss[io_base:io_base + longmode.IO_BITMAP_PORTS // 8] == bytes(
        longmode.IO_BITMAP_PORTS // 8)
    assert tss[-1] == 0xFF
