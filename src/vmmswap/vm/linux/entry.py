"""The boot vCPU's state at Linux's 64-bit entry point, and the tables that state points to.

The 64-bit boot protocol asks for long mode with paging on, an identity map covering the
kernel's decompression area, the zero page and the command line, a GDT whose selectors 0x10 and
0x18 are flat code and data, interrupts off, and ``rsi`` = the zero page. The application
processors are not set up here: with KVM's in-kernel local APIC they wait in reset for the
INIT/SIPI the kernel sends them, and start in real mode on the kernel's own trampoline.
"""

from __future__ import annotations

import struct

from vmmswap.kernel import bootparam as bp
from vmmswap.kernel import kvm as k
from vmmswap.vm.kvm import VcpuFd
from vmmswap.vm.linux.bootparams import BOOT_STACK_TOP, GDT_ADDR, PAGE_TABLES_ADDR

#: The identity map covers the first 4 GiB with 2 MiB pages: everything a boot can touch
#: (RAM sits below the 3 GiB MMIO window, the APICs just under 4 GiB).
IDENTITY_MAP_SIZE = 4 << 30
_HUGE_PAGE = 2 << 20
_TABLE_SIZE = 4096
_ENTRIES_PER_TABLE = 512
_PD_COUNT = IDENTITY_MAP_SIZE // (_HUGE_PAGE * _ENTRIES_PER_TABLE)
#: PML4, PDPT, then one page directory per GiB.
PAGE_TABLES_SIZE = _TABLE_SIZE * (2 + _PD_COUNT)

# Flat 4 GiB descriptors: limit 0xFFFFF in 4 KiB units, base 0.
_GDT_NULL = 0
_GDT_CODE64 = 0x00AF_9B00_0000_FFFF  # present, DPL0, code exec/read accessed, L=1, G=1
_GDT_DATA = 0x00CF_9300_0000_FFFF  # present, DPL0, data read/write accessed, D/B=1, G=1
#: Index = selector / 8: null, unused, __BOOT_CS (0x10), __BOOT_DS (0x18).
GDT_ENTRIES = (_GDT_NULL, _GDT_NULL, _GDT_CODE64, _GDT_DATA)

# Reset values of the x87 control word and MXCSR (all exceptions masked).
_FCW_DEFAULT = 0x37F
_MXCSR_DEFAULT = 0x1F80
_TSS_LIMIT = 0x67


def gdt_bytes() -> bytes:
    """The boot GDT, to copy to :data:`GDT_ADDR`."""
    return struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)


def identity_page_tables(base: int = PAGE_TABLES_ADDR) -> bytes:
    """PML4, PDPT and page directories identity-mapping :data:`IDENTITY_MAP_SIZE` at ``base``."""
    flags = k.X86_PTE_PRESENT | k.X86_PTE_WRITE
    pml4 = struct.pack("<Q", (base + _TABLE_SIZE) | flags).ljust(_TABLE_SIZE, b"\0")
    pdpt = b"".join(
        struct.pack("<Q", (base + _TABLE_SIZE * (2 + i)) | flags) for i in range(_PD_COUNT)
    ).ljust(_TABLE_SIZE, b"\0")
    pds = b"".join(
        struct.pack("<Q", (i * _HUGE_PAGE) | flags | k.X86_PTE_HUGE)
        for i in range(_PD_COUNT * _ENTRIES_PER_TABLE)
    )
    return pml4 + pdpt + pds


def _segment(selector: int, code: bool) -> k.KvmSegment:
    return k.KvmSegment(
        base=0, limit=0xFFFF_FFFF, selector=selector,
        type=k.X86_SEG_TYPE_CODE_XR_ACCESSED if code else k.X86_SEG_TYPE_DATA_RW_ACCESSED,
        present=1, dpl=0, db=0 if code else 1, s=1, l=1 if code else 0, g=1,
    )


def setup_boot_vcpu(vcpu: VcpuFd, entry: int, zero_page: int) -> None:
    """Put ``vcpu`` in long mode at ``entry`` with ``rsi = zero_page``.

    **Safety**: the GDT (:func:`gdt_bytes` at :data:`GDT_ADDR`) and the page tables
    (:func:`identity_page_tables` at :data:`PAGE_TABLES_ADDR`) must already be in guest memory;
    the vCPU's first instruction fetch walks them.
    """
    sregs = vcpu.get_sregs()
    code = _segment(bp.BOOT_CS, code=True)
    data = _segment(bp.BOOT_DS, code=False)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    # VMX requires a usable busy 64-bit TSS in long mode, even one nothing ever switches to.
    sregs.tr = k.KvmSegment(base=0, limit=_TSS_LIMIT, selector=0, type=k.X86_SEG_TYPE_TSS_BUSY,
                            present=1, s=0)
    sregs.gdt.base = GDT_ADDR
    sregs.gdt.limit = len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr3 = PAGE_TABLES_ADDR
    sregs.cr4 = k.X86_CR4_PAE
    sregs.cr0 = k.X86_CR0_PE | k.X86_CR0_ET | k.X86_CR0_NE | k.X86_CR0_PG
    sregs.efer = k.X86_EFER_LME | k.X86_EFER_LMA
    vcpu.set_sregs(sregs)

    regs = k.KvmRegs()
    regs.rip = entry
    regs.rsi = zero_page
    regs.rsp = BOOT_STACK_TOP
    regs.rflags = k.X86_RFLAGS_RESERVED  # interrupts off
    vcpu.set_regs(regs)

    fpu = k.KvmFpu()
    fpu.fcw = _FCW_DEFAULT
    fpu.mxcsr = _MXCSR_DEFAULT
    vcpu.set_fpu(fpu)
