"""Entering 64-bit long mode directly: identity page tables, a flat GDT, and vCPU state.

The VMM skips real mode and protected mode altogether: it writes page tables and a GDT into
guest memory and loads CR0/CR3/CR4/EFER and the segment caches so that the vCPU's first
instruction already runs in 64-bit mode. Everything here is written **before** swap is enabled
(the VMM's Python code must not touch guest memory while it is registered with userfaultfd).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import kvm as k
from vmmswap.vm.kvm import VcpuFd

PAGE_TABLE_SIZE = 4096
ENTRIES_PER_TABLE = 512
LARGE_PAGE_SIZE = 2 << 20  # a PD leaf
PD_SPAN = ENTRIES_PER_TABLE * LARGE_PAGE_SIZE  # 1 GiB per page directory
MAX_IDENTITY_MAP = ENTRIES_PER_TABLE * PD_SPAN  # one PDPT: 512 GiB

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
USER_CODE_SELECTOR = 0x18 | 3
USER_DATA_SELECTOR = 0x20 | 3
TSS_SELECTOR_BASE = 0x28  # vCPU i's TSS descriptor (16 bytes) at 0x28 + 16 * i
TSS_HEADER_SIZE = 104  # struct tss_struct of x86-64, before the I/O permission bitmap
IO_BITMAP_PORTS = 0x1000  # ring 3 may use ports below this; the bitmap denies the rest
TSS_SIZE = TSS_HEADER_SIZE + IO_BITMAP_PORTS // 8 + 1  # + the all-ones terminator byte

# Flat descriptors: base 0, limit 4 GiB (G=1). The code ones have L=1 (64-bit), D=0.
_GDT_NULL = 0
_GDT_CODE64 = 0x00AF_9B00_0000_FFFF
_GDT_DATA = 0x00CF_9300_0000_FFFF
_GDT_USER_CODE64 = 0x00AF_FB00_0000_FFFF
_GDT_USER_DATA = 0x00CF_F300_0000_FFFF
GDT_ENTRIES = (_GDT_NULL, _GDT_CODE64, _GDT_DATA, _GDT_USER_CODE64, _GDT_USER_DATA)


@dataclass(frozen=True)
class LongModeTables:
    """Where the page tables, GDT and per-vCPU TSSs were written, for every vCPU's sregs."""

    cr3: int
    gdt_base: int
    gdt_limit: int
    mapped_bytes: int
    tss_bases: tuple[int, ...] = ()


def page_table_bytes(map_limit: int) -> int:
    """Bytes of page tables needed to identity-map ``[0, map_limit)`` with 2 MiB pages."""
    return PAGE_TABLE_SIZE * (2 + _pd_count(map_limit))


def _pd_count(map_limit: int) -> int:
    if not 0 < map_limit <= MAX_IDENTITY_MAP:
        raise ValueError(f"identity map limit {map_limit:#x} must be in (0, {MAX_IDENTITY_MAP:#x}]")
    return -(-map_limit // PD_SPAN)


def build_identity_page_tables(base: int, map_limit: int, *, user: bool = False) -> bytes:
    """PML4 at ``base``, PDPT after it, then one PD per GiB: ``[0, map_limit)`` mapped 1:1.

    2 MiB leaves keep the tables small (one page per GiB) and the guest's TLB warm; the host
    still faults guest memory in 4 KiB pages, which is what vmm-swap moves.
    """
    if base % PAGE_TABLE_SIZE:
        raise ValueError(f"page tables must be page aligned, got {base:#x}")
    pds = _pd_count(map_limit)
    table_flags = k.X86_PTE_PRESENT | k.X86_PTE_WRITE | (k.X86_PTE_USER if user else 0)
    leaf_flags = table_flags | k.X86_PTE_HUGE | k.X86_PTE_ACCESSED | k.X86_PTE_DIRTY
    pml4 = [0] * ENTRIES_PER_TABLE
    pdpt_addr = base + PAGE_TABLE_SIZE
    pml4[0] = pdpt_addr | table_flags
    pdpt = [0] * ENTRIES_PER_TABLE
    out = bytearray()
    out += struct.pack(f"<{ENTRIES_PER_TABLE}Q", *pml4)
    pd_tables = bytearray()
    for i in range(pds):
        pd_addr = base + PAGE_TABLE_SIZE * (2 + i)
        pdpt[i] = pd_addr | table_flags
        first = i * ENTRIES_PER_TABLE
        pd = [((first + j) * LARGE_PAGE_SIZE) | leaf_flags
              if (first + j) * LARGE_PAGE_SIZE < map_limit else 0
              for j in range(ENTRIES_PER_TABLE)]
        pd_tables += struct.pack(f"<{ENTRIES_PER_TABLE}Q", *pd)
    out += struct.pack(f"<{ENTRIES_PER_TABLE}Q", *pdpt)
    out += pd_tables
    return bytes(out)


def build_gdt(tss_bases: Sequence[int] = ()) -> bytes:
    """The flat GDT: null, kernel code/data (0x08/0x10), user code/data (0x1B/0x23), then one
    64-bit TSS descriptor per entry of ``tss_bases``."""
    raw = struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)
    for base in tss_bases:
        limit = TSS_SIZE - 1
        low = ((limit & 0xFFFF) | ((base & 0xFF_FFFF) << 16) | (0x89 << 40)
               | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56))
        raw += struct.pack("<QQ", low, base >> 32)  # 0x89: present, available 64-bit TSS
    return raw


def build_tss(rsp0: int) -> bytes:
    """A 64-bit TSS: the ring-0 stack (RSP0) for exceptions taken in ring 3, and an I/O
    permission bitmap that lets ring 3 use every port below IO_BITMAP_PORTS.

    The bitmap, not RFLAGS.IOPL, grants port access: an IRETQ emulated by a software KVM (PVM)
    does not carry IOPL into ring 3, while the bitmap is checked the same way everywhere.
    """
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, rsp0)
    struct.pack_into("<H", tss, 102, TSS_HEADER_SIZE)
    tss[-1] = 0xFF  # the terminator the CPU reads past the last port byte
    return bytes(tss)


def write_long_mode_tables(memory: GuestMemory, *, gdt_addr: int, page_tables_addr: int,
                           map_limit: int, user: bool = False, tss_addr: int | None = None,
                           kernel_stacks: Sequence[int] = ()) -> LongModeTables:
    """Write the GDT, identity page tables and (optionally) one TSS per kernel stack.

    ``user`` sets the U bit in every page-table entry so code can run in ring 3 over the whole
    identity map. ``kernel_stacks`` are the RSP0 values of the vCPUs' TSSs, written from
    ``tss_addr`` on, TSS_SIZE bytes apart.

    **Safety**: call before swap is enabled, and only on guest ranges the guest program does not
    use for anything else.
    """
    tss_bases: tuple[int, ...] = ()
    if kernel_stacks:
        if tss_addr is None:
            raise ValueError("kernel stacks need a tss_addr to write their TSSs at")
        tss_bases = tuple(tss_addr + i * TSS_SIZE for i in range(len(kernel_stacks)))
        memory.write(tss_addr, b"".join(build_tss(rsp0) for rsp0 in kernel_stacks))
    gdt = build_gdt(tss_bases)
    memory.write(gdt_addr, gdt)
    memory.write(page_tables_addr,
                 build_identity_page_tables(page_tables_addr, map_limit, user=user))
    return LongModeTables(cr3=page_tables_addr, gdt_base=gdt_addr, gdt_limit=len(gdt) - 1,
                          mapped_bytes=map_limit, tss_bases=tss_bases)


def _segment(selector: int, seg_type: int, *, code: bool) -> k.KvmSegment:
    return k.KvmSegment(base=0, limit=0xFFFF_FFFF, selector=selector, type=seg_type,
                        present=1, dpl=0, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def long_mode_sregs(sregs: k.KvmSregs, tables: LongModeTables, vcpu_index: int = 0) -> None:
    """Turn a vCPU's reset-state sregs into 64-bit long mode with paging on ``tables``."""
    sregs.cs = _segment(CODE_SELECTOR, k.X86_SEG_TYPE_CODE_XR_ACCESSED, code=True)
    data = _segment(DATA_SELECTOR, k.X86_SEG_TYPE_DATA_RW_ACCESSED, code=False)
    sregs.ds = data
    sregs.es = data
    sregs.fs = data
    sregs.gs = data
    sregs.ss = data
    sregs.gdt.base = tables.gdt_base
    sregs.gdt.limit = tables.gdt_limit
    if tables.tss_bases:
        sregs.tr = k.KvmSegment(base=tables.tss_bases[vcpu_index], limit=TSS_SIZE - 1,
                                selector=TSS_SELECTOR_BASE + 16 * vcpu_index,
                                type=k.X86_SEG_TYPE_TSS_BUSY, present=1, s=0)
    sregs.cr3 = tables.cr3
    sregs.cr4 = k.X86_CR4_PAE | k.X86_CR4_OSFXSR | k.X86_CR4_OSXMMEXCPT
    sregs.cr0 = (k.X86_CR0_PE | k.X86_CR0_MP | k.X86_CR0_ET | k.X86_CR0_NE | k.X86_CR0_WP
                 | k.X86_CR0_PG)
    sregs.efer = k.X86_EFER_LME | k.X86_EFER_LMA


def enter_long_mode(vcpu: VcpuFd, tables: LongModeTables, *, rip: int, rsp: int,
                    args: tuple[int, ...] = ()) -> None:
    """Set ``vcpu`` to start at ``rip`` in 64-bit mode, with ``args`` in rdi, rsi, rdx, rcx.

    The vCPU starts in ring 0 with interrupts disabled (RFLAGS.IF = 0): the built-in guest has
    no interrupt sources. When ``tables`` has TSSs, TR points at this vCPU's.
    """
    if len(args) > 4:
        raise ValueError("at most four register arguments (rdi, rsi, rdx, rcx)")
    sregs = vcpu.get_sregs()
    long_mode_sregs(sregs, tables, vcpu.index)
    vcpu.set_sregs(sregs)
    regs = k.KvmRegs()
    regs.rip = rip
    regs.rsp = rsp
    regs.rflags = k.X86_RFLAGS_RESERVED
    for name, value in zip(("rdi", "rsi", "rdx", "rcx"), args, strict=False):
        setattr(regs, name, value)
    vcpu.set_regs(regs)
