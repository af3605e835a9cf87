"""The zero page, e820 map, command line, initrd placement, MP table and boot GDT/page tables."""

from __future__ import annotations

import ctypes
import struct

import pytest
from linux_helpers import make_bzimage

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import bootparam as bp
from vmmswap.kernel import mptable as mp
from vmmswap.vm.linux import bootparams as layout
from vmmswap.vm.linux.bzimage import BzImage
from vmmswap.vm.linux.entry import GDT_ENTRIES, gdt_bytes, identity_page_tables
from vmmswap.vm.linux.mptable import build_mptable

MIB = layout.MIB


def test_struct_sizes_match_the_abi() -> None:
    assert ctypes.sizeof(bp.BootParams) == 4096
    assert ctypes.sizeof(bp.SetupHeader) == 0x26C - 0x1F1
    assert bp.BootParams.hdr.offset == 0x1F1
    assert bp.BootParams.e820_table.offset == 0x2D0


def test_e820_map_reserves_mp_table_and_skips_legacy_hole() -> None:
    ranges = layout.e820_map(256 * MIB)
    assert [(r.addr, r.end, r.type) for r in ranges] == [
        (0, layout.MPTABLE_ADDR, bp.E820Type.RAM),
        (layout.MPTABLE_ADDR, 0xA0000, bp.E820Type.RESERVED),
        (0x100000, 256 * MIB, bp.E820Type.RAM),
    ]


@pytest.mark.parametrize("size", [32 * MIB, 4096 * MIB, 256 * MIB + 1])
def test_memory_size_out_of_range_is_rejected(size: int) -> None:
    with pytest.raises(ValueError, match="guest memory size"):
        layout.e820_map(size)


def test_zero_page_carries_header_and_loader_fields() -> None:
    image = BzImage.parse(make_bzimage())
    e820 = layout.e820_map(256 * MIB)
    raw = layout.build_zero_page(image, cmdline_addr=0x20000, initrd_addr=0xF000000,
                                 initrd_size=12345, e820=e820)
    params = bp.BootParams.from_buffer_copy(raw)
    assert len(raw) == 4096
    assert params.hdr.header == bp.HDRS_MAGIC
    assert params.hdr.type_of_loader == bp.LOADER_TYPE_UNDEFINED
    assert params.hdr.loadflags & bp.LoadFlags.LOADED_HIGH
    assert params.hdr.cmd_line_ptr == 0x20000 and params.ext_cmd_line_ptr == 0
    assert (params.hdr.ramdisk_image, params.hdr.ramdisk_size) == (0xF000000, 12345)
    assert params.hdr.cmdline_size == 2047  # the kernel's, untouched
    assert params.e820_entries == 3
    assert params.e820_table[2].addr == 0x100000
    assert params.e820_table[2].type == bp.E820Type.RAM
    assert params.sentinel == 0


def test_zero_page_splits_addresses_above_4g() -> None:
    image = BzImage.parse(make_bzimage())
    raw = layout.build_zero_page(image, cmdline_addr=0x1_2345_6000, initrd_addr=0x2_0000_0000,
                                 initrd_size=1 << 32 | 5, e820=[])
    params = bp.BootParams.from_buffer_copy(raw)
    assert (params.ext_cmd_line_ptr, params.hdr.cmd_line_ptr) == (1, 0x2345_6000)
    assert (params.ext_ramdisk_image, params.hdr.ramdisk_image) == (2, 0)
    assert (params.ext_ramdisk_size, params.hdr.ramdisk_size) == (1, 5)


def test_cmdline_is_nul_terminated_and_bounded() -> None:
    assert layout.encode_cmdline("console=ttyS0", 100) == b"console=ttyS0\0"
    with pytest.raises(ValueError, match="accepts 5"):
        layout.encode_cmdline("console=ttyS0", 5)
    with pytest.raises(ValueError, match="ASCII"):
        layout.encode_cmdline("console=tty\u00e9", 100)


def test_initrd_goes_high_and_page_aligned() -> None:
    addr = layout.initrd_address(0x4A00000, 0x7FFFFFFF, 256 * MIB, 1_000_000)
    assert addr % 4096 == 0
    assert addr + 1_000_000 <= 256 * MIB < addr + 1_000_000 + 4096
    assert layout.initrd_address(0x4A00000, 128 * MIB - 1, 256 * MIB, 4096) == 128 * MIB - 4096


def test_initrd_that_would_overlap_the_kernel_is_rejected() -> None:
    with pytest.raises(ValueError, match="more memory"):
        layout.initrd_address(250 * MIB, 0x7FFFFFFF, 256 * MIB, 8 * MIB)


class RecordingMemory:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def write(self, guest_addr: int, data: bytes | memoryview) -> None:
        self.writes.append((guest_addr, bytes(data)))


def test_write_sparse_skips_zero_pages() -> None:
    memory = RecordingMemory()
    data = b"A" * 4096 + bytes(8192) + b"B" * 4096 + b"C" * 100
    written = layout.write_sparse(memory, 0x10000, data)  # type: ignore[arg-type]
    assert written == 4096 * 2 + 100
    assert memory.writes == [(0x10000, b"A" * 4096), (0x13000, b"B" * 4096 + b"C" * 100)]


def test_write_sparse_lands_in_guest_memory() -> None:
    memory = GuestMemory.create([(0, 64 * MIB)])
    try:
        data = b"A" * 4096 + bytes(8192) + b"B" * 100
        layout.write_sparse(memory, 0x10000, data)
        assert memory.read(0x10000, len(data)) == data
    finally:
        memory.close()


def test_write_sparse_needs_page_alignment() -> None:
    with pytest.raises(ValueError, match="aligned"):
        layout.write_sparse(RecordingMemory(), 0x10001, b"x")  # type: ignore[arg-type]


def test_mptable_checksums_and_entries() -> None:
    table = build_mptable(layout.MPTABLE_ADDR, 2)
    pointer = mp.MpFloatingPointer.from_buffer_copy(table)
    assert pointer.signature == b"_MP_" and sum(table[:16]) % 256 == 0
    assert pointer.physptr == layout.MPTABLE_ADDR + 16
    config = mp.MpConfigTable.from_buffer_copy(table, 16)
    assert config.signature == b"PCMP"
    assert sum(table[16:16 + config.length]) % 256 == 0
    assert 16 + config.length == len(table)
    kinds = [table[at] for at in _entry_offsets(table, config)]
    assert kinds == [0, 0, 1, 2] + [3] * 16 + [4, 4]
    cpu0 = mp.MpProcessor.from_buffer_copy(table, 16 + 44)
    cpu1 = mp.MpProcessor.from_buffer_copy(table, 16 + 44 + 20)
    assert cpu0.cpuflag == mp.CpuFlags.ENABLED | mp.CpuFlags.BOOT_PROCESSOR
    assert (cpu1.apicid, cpu1.cpuflag) == (1, mp.CpuFlags.ENABLED)
    ioapic = mp.MpIoApic.from_buffer_copy(table, 16 + 44 + 40 + 8)
    assert (ioapic.apicid, ioapic.apicaddr) == (2, mp.IOAPIC_DEFAULT_BASE)


def _entry_offsets(table: bytes, config: mp.MpConfigTable) -> list[int]:
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    offsets, at = [], 16 + 44
    for _ in range(config.count):
        offsets.append(at)
        at += sizes[table[at]]
    return offsets


def test_mptable_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="vCPUs"):
        build_mptable(layout.MPTABLE_ADDR, 0)
    with pytest.raises(ValueError, match="aligned"):
        build_mptable(layout.MPTABLE_ADDR + 4, 1)
    with pytest.raises(ValueError, match="more than"):
        build_mptable(layout.MPTABLE_ADDR, 60)


def test_boot_gdt_has_flat_boot_selectors() -> None:
    gdt = struct.unpack("<4Q", gdt_bytes())
    assert gdt == GDT_ENTRIES
    code, data = gdt[bp.BOOT_CS // 8], gdt[bp.BOOT_DS // 8]
    assert code >> 53 & 1 == 1  # L: 64-bit code
    assert data >> 41 & 1 == 1  # writable data


def test_identity_page_tables_map_4g_with_2m_pages() -> None:
    base = layout.PAGE_TABLES_ADDR
    tables = identity_page_tables(base)
    pml4 = struct.unpack_from("<Q", tables, 0)[0]
    assert pml4 & ~0xFFF == base + 4096
    pdpt = struct.unpack_from("<4Q", tables, 4096)
    assert [e & ~0xFFF for e in pdpt] == [base + 4096 * (2 + i) for i in range(4)]
    last = struct.unpack_from("<Q", tables, len(tables) - 8)[0]
    assert last & ~0xFFF == (4 << 30) - (2 << 20)
    assert last & 0x80  # PS: a 2 MiB leaf
