"""The guest-physical layout of a Linux boot, and the zero page (boot_params) that describes it.

Low memory holds what the 64-bit entry point needs before the kernel runs its own code: a boot
GDT, identity page tables, the zero page, the command line and the MP table. The kernel goes
where its ELF says and the initramfs as high as the kernel allows. Every
address is fixed here so that the map can be read in one place:

====================  ===========================================================
0x0000_0500           boot GDT (null, null, __BOOT_CS, __BOOT_DS)
0x0000_7000           zero page (``struct boot_params``), ``rsi`` at entry
0x0000_8000..0x9000   boot stack (the decompressor switches to its own at once)
0x0000_9000           identity page tables (PML4, PDPT, page directories)
0x0002_0000           kernel command line
0x0009_FC00           MP floating pointer and configuration table (e820 reserved)
0x0100_0000           the kernel's ELF segments at their physical addresses (16 MiB
                      for Debian's); entry at ``startup_64``
top of RAM - initrd   initramfs, page aligned, below ``initrd_addr_max``
====================  ===========================================================
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import bootparam as bp
from vmmswap.uffd.pagesize import PAGE_SIZE, is_page_aligned, page_base, page_round_up
from vmmswap.vm.linux.bzimage import BzImage

MIB = 1024 * 1024

GDT_ADDR = 0x500
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x9000
PAGE_TABLES_ADDR = 0x9000
CMDLINE_ADDR = 0x20000
MPTABLE_ADDR = 0x9FC00
#: The end of conventional memory: above it sit the VGA window and the BIOS ROM area.
LOW_RAM_END = 0xA0000
#: RAM above the legacy hole starts at 1 MiB.
HIGH_RAM_START = 0x100000

#: The lowest guest-physical address of the MMIO window (I/O APIC, local APIC, ...); RAM must
#: end below it because the guest is given one contiguous region.
MMIO_WINDOW_START = 0xC000_0000
#: Below this the kernel and its decompression area do not fit alongside an initramfs.
MIN_MEMORY = 64 * MIB


@dataclass(frozen=True)
class E820Range:
    addr: int
    size: int
    type: bp.E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(memory_size: int) -> list[E820Range]:
    """The memory map of a guest with ``memory_size`` bytes of RAM from guest address 0.

    Conventional memory below the MP table and everything from 1 MiB up is RAM; the MP table is
    reserved so that the kernel keeps it; 0xA0000..1 MiB is left out as on a PC.
    """
    check_memory_size(memory_size)
    return [
        E820Range(0, MPTABLE_ADDR, bp.E820Type.RAM),
        E820Range(MPTABLE_ADDR, LOW_RAM_END - MPTABLE_ADDR, bp.E820Type.RESERVED),
        E820Range(HIGH_RAM_START, memory_size - HIGH_RAM_START, bp.E820Type.RAM),
    ]


def check_memory_size(memory_size: int) -> None:
    """ValueError unless ``memory_size`` fits this layout (one region, below the MMIO window)."""
    if not is_page_aligned(memory_size):
        raise ValueError(f"guest memory size {memory_size:#x} is not a multiple of {PAGE_SIZE}")
    if not MIN_MEMORY <= memory_size <= MMIO_WINDOW_START:
        raise ValueError(
            f"guest memory size {memory_size // MIB} MiB is outside "
            f"[{MIN_MEMORY // MIB}, {MMIO_WINDOW_START // MIB}] MiB"
        )


def encode_cmdline(cmdline: str, limit: int) -> bytes:
    """The NUL-terminated command line; ValueError if it is too long or not plain ASCII."""
    try:
        raw = cmdline.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"kernel command line {cmdline!r} is not ASCII") from None
    if b"\0" in raw:
        raise ValueError("kernel command line contains a NUL byte")
    if len(raw) > limit:
        raise ValueError(f"kernel command line is {len(raw)} bytes, the kernel accepts {limit}")
    if CMDLINE_ADDR + len(raw) + 1 > MPTABLE_ADDR:
        raise ValueError("kernel command line would overlap the MP table")
    return raw + b"\0"


def initrd_address(kernel_end: int, initrd_addr_max: int, memory_size: int,
                   initrd_size: int) -> int:
    """Where the initramfs goes: as high as the kernel allows, above the kernel's last byte."""
    top = min(memory_size, initrd_addr_max + 1)
    addr = page_base(top - initrd_size)
    if initrd_size <= 0 or addr < page_round_up(kernel_end):
        raise ValueError(
            f"a {initrd_size}-byte initramfs does not fit between the kernel "
            f"(up to {kernel_end:#x}) and {top:#x}: give the guest more memory"
        )
    return addr


def write_sparse(memory: GuestMemory, guest_addr: int, data: bytes | memoryview) -> int:
    """Copy ``data`` to guest memory except its all-zero pages; returns the bytes written.

    Guest memory starts out zero (a fresh memfd), so skipping zero pages changes nothing the
    guest can see and keeps them unallocated: vmm-swap then has nothing to move for them.
    ``guest_addr`` must be page aligned.
    """
    if not is_page_aligned(guest_addr):
        raise ValueError(f"sparse copy target {guest_addr:#x} is not page aligned")
    view = memoryview(data).cast("B")
    zero = bytes(PAGE_SIZE)
    written = 0
    run_start: int | None = None
    for offset in range(0, len(view) + PAGE_SIZE, PAGE_SIZE):
        chunk = view[offset:offset + PAGE_SIZE]
        nonzero = len(chunk) > 0 and chunk != zero[:len(chunk)]
        if nonzero and run_start is None:
            run_start = offset
        elif not nonzero and run_start is not None:
            memory.write(guest_addr + run_start, view[run_start:offset])
            written += min(offset, len(view)) - run_start
            run_start = None
    return written


def build_zero_page(
    image: BzImage,
    *,
    cmdline_addr: int,
    initrd_addr: int,
    initrd_size: int,
    e820: Sequence[E820Range],
) -> bytes:
    """``struct boot_params`` for the 64-bit entry point, as the 4096 bytes to copy in place.

    The setup header is the image's own, with the fields a loader must write filled in; every
    field the kernel would otherwise take from a BIOS stays zero (which it reads as "absent").
    """
    if len(e820) > bp.E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(e820)} e820 ranges; the zero page holds "
                         f"{bp.E820_MAX_ENTRIES_ZEROPAGE}")
    params = bp.BootParams()
    header = image.header_bytes
    ctypes.memmove(ctypes.addressof(params.hdr), header, len(header))
    hdr = params.hdr
    hdr.type_of_loader = bp.LOADER_TYPE_UNDEFINED
    hdr.loadflags = bp.LoadFlags.LOADED_HIGH | bp.LoadFlags.CAN_USE_HEAP
    hdr.cmd_line_ptr = cmdline_addr & 0xFFFF_FFFF
    params.ext_cmd_line_ptr = cmdline_addr >> 32
    hdr.ramdisk_image = initrd_addr & 0xFFFF_FFFF
    params.ext_ramdisk_image = initrd_addr >> 32
    hdr.ramdisk_size = initrd_size & 0xFFFF_FFFF
    params.ext_ramdisk_size = initrd_size >> 32
    for i, entry in enumerate(e820):
        params.e820_table[i] = bp.E820Entry(entry.addr, entry.size, entry.type)
    params.e820_entries = len(e820)
    return bytes(params)
