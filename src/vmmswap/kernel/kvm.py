"""KVM's ioctl ABI (x86-64): request numbers, constants and ``struct`` layouts.

Everything the micro-VM (:mod:`vmmswap.vm`) and the Linux-guest loader (:mod:`vmmswap.vm.linux`)
pass to ``/dev/kvm`` is defined here, so a reader can check it against ``<linux/kvm.h>`` and
``<asm/kvm.h>`` in one place. Request numbers are computed with :mod:`vmmswap.kernel.ioctl` from
the struct sizes below, which makes a wrong layout show up as ENOTTY/EINVAL rather than as silent
corruption. The x86 architectural bits a VMM writes into ``kvm_sregs`` (CR0, CR4, EFER, segment
types, page-table flags) are here as well, because they are half of that ABI.
"""

from __future__ import annotations

import ctypes
from typing import Final

from vmmswap.kernel.ioctl import io, ior, iow, iowr

KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12

# --- structs -------------------------------------------------------------------------------------


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs``: the general-purpose registers (KVM_GET_REGS / KVM_SET_REGS)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
    )]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``: a segment register with its hidden descriptor cache."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``: GDTR / IDTR."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


KVM_NR_INTERRUPTS: Final = 256


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs``: segments, descriptor tables, control registers, EFER."""

    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmFpu(ctypes.Structure):
    """``struct kvm_fpu``: x87 and SSE state (KVM_GET_FPU / KVM_SET_FPU)."""

    _fields_ = [
        ("fpr", (ctypes.c_uint8 * 16) * 8),
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64),
        ("last_dp", ctypes.c_uint64),
        ("xmm", (ctypes.c_uint8 * 16) * 16),
        ("mxcsr", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region``: one guest-physical slot backed by host memory."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2``: one CPUID leaf/subleaf."""

    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    """The fixed part of ``struct kvm_cpuid2``; entries follow (see :func:`kvm_cpuid2`)."""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


def kvm_cpuid2(nent: int) -> type[ctypes.Structure]:
    """``struct kvm_cpuid2`` with room for ``nent`` entries (a flexible array in C)."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [
            ("nent", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("entries", KvmCpuidEntry2 * nent),
        ]

    return KvmCpuid2


class KvmMsrEntry(ctypes.Structure):
    """``struct kvm_msr_entry``."""

    _fields_ = [
        ("index", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
    ]


class KvmMsrsHeader(ctypes.Structure):
    """The fixed part of ``struct kvm_msrs``; entries follow (see :func:`kvm_msrs`)."""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def kvm_msrs(nmsrs: int) -> type[ctypes.Structure]:
    """``struct kvm_msrs`` with room for ``nmsrs`` entries."""

    class KvmMsrs(ctypes.Structure):
        _fields_ = [
            ("nmsrs", ctypes.c_uint32),
            ("pad", ctypes.c_uint32),
            ("entries", KvmMsrEntry * nmsrs),
        ]

    return KvmMsrs


class KvmMsrListHeader(ctypes.Structure):
    """The fixed part of ``struct kvm_msr_list``; u32 indices follow."""

    _fields_ = [("nmsrs", ctypes.c_uint32)]


class KvmIrqLevel(ctypes.Structure):
    """``struct kvm_irq_level`` (``irq`` shares its slot with the ``status`` result)."""

    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint32)]


class KvmPitConfig(ctypes.Structure):
    """``struct kvm_pit_config`` for KVM_CREATE_PIT2."""

    _fields_ = [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 15)]


class KvmMpState(ctypes.Structure):
    """``struct kvm_mp_state``."""

    _fields_ = [("mp_state", ctypes.c_uint32)]


class KvmIrqfd(ctypes.Structure):
    """``struct kvm_irqfd``: an eventfd that raises a GSI."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("gsi", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resamplefd", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 16),
    ]


class KvmIoeventfd(ctypes.Structure):
    """``struct kvm_ioeventfd``: an eventfd signalled by a guest write, without an exit."""

    _fields_ = [
        ("datamatch", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 36),
    ]


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap``."""

    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class KvmClockData(ctypes.Structure):
    """``struct kvm_clock_data`` (KVM_GET_CLOCK / KVM_SET_CLOCK)."""

    _fields_ = [
        ("clock", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("realtime", ctypes.c_uint64),
        ("host_tsc", ctypes.c_uint64),
        ("pad", ctypes.c_uint32 * 4),
    ]


class KvmLapicState(ctypes.Structure):
    """``struct kvm_lapic_state``: the local APIC register page."""

    _fields_ = [("regs", ctypes.c_char * 1024)]


#: Offset of the spurious-interrupt vector register in the local APIC's register page, and its
#: APIC software-enable bit (SDM vol. 3, 11.9). KVM resets it to 0xFF: software-disabled.
APIC_SVR_OFFSET: Final = 0xF0
APIC_SVR_ENABLE: Final = 0x100


class KvmVcpuEvents(ctypes.Structure):
    """``struct kvm_vcpu_events`` (64 bytes)."""

    _fields_ = [
        ("exception_injected", ctypes.c_uint8),
        ("exception_nr", ctypes.c_uint8),
        ("exception_has_error_code", ctypes.c_uint8),
        ("exception_pending", ctypes.c_uint8),
        ("exception_error_code", ctypes.c_uint32),
        ("interrupt_injected", ctypes.c_uint8),
        ("interrupt_nr", ctypes.c_uint8),
        ("interrupt_soft", ctypes.c_uint8),
        ("interrupt_shadow", ctypes.c_uint8),
        ("nmi_injected", ctypes.c_uint8),
        ("nmi_pending", ctypes.c_uint8),
        ("nmi_masked", ctypes.c_uint8),
        ("nmi_pad", ctypes.c_uint8),
        ("sipi_vector", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("smi", ctypes.c_uint8 * 4),
        ("reserved", ctypes.c_uint8 * 27),
        ("exception_has_payload", ctypes.c_uint8),
        ("exception_payload", ctypes.c_uint64),
    ]


# --- struct kvm_run (the mmap of a vCPU fd) ------------------------------------------------------


class KvmRunHw(ctypes.Structure):
    """``kvm_run.hw`` (KVM_EXIT_UNKNOWN)."""

    _fields_ = [("hardware_exit_reason", ctypes.c_uint64)]


class KvmRunFailEntry(ctypes.Structure):
    """``kvm_run.fail_entry`` (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class KvmRunEx(ctypes.Structure):
    """``kvm_run.ex`` (KVM_EXIT_EXCEPTION)."""

    _fields_ = [("exception", ctypes.c_uint32), ("error_code", ctypes.c_uint32)]


class KvmRunIo(ctypes.Structure):
    """``kvm_run.io`` (KVM_EXIT_IO): data lives at ``data_offset`` bytes into the kvm_run mmap."""

    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class KvmRunMmio(ctypes.Structure):
    """``kvm_run.mmio`` (KVM_EXIT_MMIO)."""

    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class KvmRunInternal(ctypes.Structure):
    """``kvm_run.internal`` (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = [
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class KvmRunSystemEvent(ctypes.Structure):
    """``kvm_run.system_event`` (KVM_EXIT_SYSTEM_EVENT)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class KvmRunExit(ctypes.Union):
    """The exit-reason union of ``struct kvm_run`` (256 bytes)."""

    _fields_ = [
        ("hw", KvmRunHw),
        ("fail_entry", KvmRunFailEntry),
        ("ex", KvmRunEx),
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("internal", KvmRunInternal),
        ("system_event", KvmRunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    """``struct kvm_run``, the shared page KVM_RUN reports exits through.

    It lives in the mmap of the vCPU fd, not in guest memory, so Python may read it while
    guest memory is registered with userfaultfd.
    """

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", KvmRunExit),
        ("kvm_valid_regs", ctypes.c_uint64),
        ("kvm_dirty_regs", ctypes.c_uint64),
        ("s", ctypes.c_char * 2048),
    ]


# --- ioctls on /dev/kvm --------------------------------------------------------------------------
KVM_GET_API_VERSION: Final = io(KVMIO, 0x00)
KVM_CREATE_VM: Final = io(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST: Final = iowr(KVMIO, 0x02, ctypes.sizeof(KvmMsrListHeader))
KVM_CHECK_EXTENSION: Final = io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = io(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID: Final = iowr(KVMIO, 0x05, ctypes.sizeof(KvmCpuid2Header))
KVM_GET_EMULATED_CPUID: Final = iowr(KVMIO, 0x09, ctypes.sizeof(KvmCpuid2Header))

# --- ioctls on a VM fd ---------------------------------------------------------------------------
KVM_CREATE_VCPU: Final = io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION: Final = iow(KVMIO, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR: Final = io(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = iow(KVMIO, 0x48, ctypes.sizeof(ctypes.c_uint64))
KVM_CREATE_IRQCHIP: Final = io(KVMIO, 0x60)
KVM_IRQ_LINE: Final = iow(KVMIO, 0x61, ctypes.sizeof(KvmIrqLevel))
KVM_IRQ_LINE_STATUS: Final = iowr(KVMIO, 0x67, ctypes.sizeof(KvmIrqLevel))
KVM_IRQFD: Final = iow(KVMIO, 0x76, ctypes.sizeof(KvmIrqfd))
KVM_CREATE_PIT2: Final = iow(KVMIO, 0x77, ctypes.sizeof(KvmPitConfig))
KVM_SET_BOOT_CPU_ID: Final = io(KVMIO, 0x78)
KVM_IOEVENTFD: Final = iow(KVMIO, 0x79, ctypes.sizeof(KvmIoeventfd))
KVM_SET_CLOCK: Final = iow(KVMIO, 0x7B, ctypes.sizeof(KvmClockData))
KVM_GET_CLOCK: Final = ior(KVMIO, 0x7C, ctypes.sizeof(KvmClockData))
KVM_ENABLE_CAP: Final = iow(KVMIO, 0xA3, ctypes.sizeof(KvmEnableCap))

# --- ioctls on a vCPU fd -------------------------------------------------------------------------
KVM_RUN: Final = io(KVMIO, 0x80)
KVM_GET_REGS: Final = ior(KVMIO, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS: Final = iow(KVMIO, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS: Final = ior(KVMIO, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS: Final = iow(KVMIO, 0x84, ctypes.sizeof(KvmSregs))
KVM_GET_MSRS: Final = iowr(KVMIO, 0x88, ctypes.sizeof(KvmMsrsHeader))
KVM_SET_MSRS: Final = iow(KVMIO, 0x89, ctypes.sizeof(KvmMsrsHeader))
KVM_GET_FPU: Final = ior(KVMIO, 0x8C, ctypes.sizeof(KvmFpu))
KVM_SET_FPU: Final = iow(KVMIO, 0x8D, ctypes.sizeof(KvmFpu))
KVM_GET_LAPIC: Final = ior(KVMIO, 0x8E, ctypes.sizeof(KvmLapicState))
KVM_SET_LAPIC: Final = iow(KVMIO, 0x8F, ctypes.sizeof(KvmLapicState))
KVM_SET_CPUID2: Final = iow(KVMIO, 0x90, ctypes.sizeof(KvmCpuid2Header))
KVM_GET_CPUID2: Final = iowr(KVMIO, 0x91, ctypes.sizeof(KvmCpuid2Header))
KVM_GET_MP_STATE: Final = ior(KVMIO, 0x98, ctypes.sizeof(KvmMpState))
KVM_SET_MP_STATE: Final = iow(KVMIO, 0x99, ctypes.sizeof(KvmMpState))
KVM_GET_VCPU_EVENTS: Final = ior(KVMIO, 0x9F, ctypes.sizeof(KvmVcpuEvents))
KVM_SET_VCPU_EVENTS: Final = iow(KVMIO, 0xA0, ctypes.sizeof(KvmVcpuEvents))
KVM_SET_TSC_KHZ: Final = io(KVMIO, 0xA2)
KVM_GET_TSC_KHZ: Final = io(KVMIO, 0xA3)

# --- capabilities (KVM_CHECK_EXTENSION) ----------------------------------------------------------
KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_HLT: Final = 1
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_SET_TSS_ADDR: Final = 4
KVM_CAP_EXT_CPUID: Final = 7
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_PIT: Final = 11
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_IRQ_ROUTING: Final = 25
KVM_CAP_IRQFD: Final = 32
KVM_CAP_PIT2: Final = 33
KVM_CAP_SET_BOOT_CPU_ID: Final = 34
KVM_CAP_IOEVENTFD: Final = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR: Final = 37
KVM_CAP_ADJUST_CLOCK: Final = 39
KVM_CAP_INTERNAL_ERROR_DATA: Final = 40
KVM_CAP_VCPU_EVENTS: Final = 41
KVM_CAP_XSAVE: Final = 55
KVM_CAP_XCRS: Final = 56
KVM_CAP_TSC_CONTROL: Final = 60
KVM_CAP_GET_TSC_KHZ: Final = 61
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_TSC_DEADLINE_TIMER: Final = 72
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_CHECK_EXTENSION_VM: Final = 105
KVM_CAP_SPLIT_IRQCHIP: Final = 121
KVM_CAP_MAX_VCPU_ID: Final = 128
KVM_CAP_X2APIC_API: Final = 129
KVM_CAP_IMMEDIATE_EXIT: Final = 136

# --- exit reasons (kvm_run.exit_reason) ----------------------------------------------------------
KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_SET_TPR: Final = 11
KVM_EXIT_TPR_ACCESS: Final = 12
KVM_EXIT_NMI: Final = 16
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_IOAPIC_EOI: Final = 26
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30
KVM_EXIT_X86_BUS_LOCK: Final = 33
KVM_EXIT_NOTIFY: Final = 37
KVM_EXIT_MEMORY_FAULT: Final = 39

EXIT_REASON_NAMES: Final[dict[int, str]] = {
    value: name for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

KVM_INTERNAL_ERROR_EMULATION: Final = 1
KVM_INTERNAL_ERROR_SIMUL_EX: Final = 2
KVM_INTERNAL_ERROR_DELIVERY_EV: Final = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: Final = 4
#: ``kvm_run.emulation_failure.flags``: ``insn_size``/``insn_bytes`` are valid.
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: Final = 1

KVM_SYSTEM_EVENT_SHUTDOWN: Final = 1
KVM_SYSTEM_EVENT_RESET: Final = 2
KVM_SYSTEM_EVENT_CRASH: Final = 3

# --- flags ---------------------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1

KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = 1 << 0
KVM_PIT_SPEAKER_DUMMY: Final = 1

KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_UNINITIALIZED: Final = 1
KVM_MP_STATE_INIT_RECEIVED: Final = 2
KVM_MP_STATE_HALTED: Final = 3
KVM_MP_STATE_SIPI_RECEIVED: Final = 4

# The pio data page is the second page of the kvm_run mmap (KVM_PIO_PAGE_OFFSET).
KVM_PIO_PAGE_OFFSET: Final = 1

# Where Intel VMX keeps its real-mode helper structures: three pages below the BIOS area,
# the conventional choice (QEMU, crosvm, Firecracker) that stays out of every guest RAM layout.
KVM_DEFAULT_TSS_ADDR: Final = 0xFFFB_D000
KVM_DEFAULT_IDENTITY_MAP_ADDR: Final = 0xFFFB_C000

# --- x86 architecture: what goes into kvm_sregs and page tables ----------------------------------
X86_CR0_PE: Final = 1 << 0
X86_CR0_MP: Final = 1 << 1
X86_CR0_EM: Final = 1 << 2
X86_CR0_TS: Final = 1 << 3
X86_CR0_ET: Final = 1 << 4
X86_CR0_NE: Final = 1 << 5
X86_CR0_WP: Final = 1 << 16
X86_CR0_AM: Final = 1 << 18
X86_CR0_NW: Final = 1 << 29
X86_CR0_CD: Final = 1 << 30
X86_CR0_PG: Final = 1 << 31

X86_CR4_PSE: Final = 1 << 4
X86_CR4_PAE: Final = 1 << 5
X86_CR4_PGE: Final = 1 << 7
X86_CR4_OSFXSR: Final = 1 << 9
X86_CR4_OSXMMEXCPT: Final = 1 << 10

X86_EFER_SCE: Final = 1 << 0
X86_EFER_LME: Final = 1 << 8
X86_EFER_LMA: Final = 1 << 10
X86_EFER_NXE: Final = 1 << 11

X86_RFLAGS_RESERVED: Final = 1 << 1  # bit 1 always reads as one
X86_RFLAGS_IF: Final = 1 << 9

# Page-table entry bits (4-level paging).
X86_PTE_PRESENT: Final = 1 << 0
X86_PTE_WRITE: Final = 1 << 1
X86_PTE_USER: Final = 1 << 2
X86_PTE_ACCESSED: Final = 1 << 5
X86_PTE_DIRTY: Final = 1 << 6
X86_PTE_HUGE: Final = 1 << 7  # PS: a 2 MiB (PD) or 1 GiB (PDPT) leaf

# Segment descriptor types (the 4-bit type field with S=1).
X86_SEG_TYPE_DATA_RW_ACCESSED: Final = 0x3
X86_SEG_TYPE_CODE_XR_ACCESSED: Final = 0xB
X86_SEG_TYPE_TSS_BUSY: Final = 0xB  # with S=0: 64-bit busy TSS

# CPUID bits the VMM adjusts.
X86_CPUID_HYPERVISOR_ECX: Final = 1 << 31  # leaf 1 ECX: running under a hypervisor
X86_CPUID_PDPE1GB_EDX: Final = 1 << 26  # leaf 0x80000001 EDX: 1 GiB pages
