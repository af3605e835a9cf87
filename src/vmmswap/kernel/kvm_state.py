"""KVM's ABI for snapshots (x86-64): the state a VMM saves and loads, and dirty logging.

The structs, request numbers and flags of :mod:`vmmswap.vm.machine_state` (in-kernel irqchip,
PIT, XSAVE area and XCRs, kvmclock flags, vCPU-event flags), KVM_GET_DIRTY_LOG for diff
snapshots, and the x86 MSRs a snapshot carries. Kept apart from :mod:`vmmswap.kernel.kvm` (the
ioctls that create and run a VM) so each stays one readable page per concern; both are checked
against ``<linux/kvm.h>`` by ``tests/vm/test_kvm_abi.py``.
"""

from __future__ import annotations

import ctypes
from typing import Final

from vmmswap.kernel.ioctl import ior, iow, iowr
from vmmswap.kernel.kvm import KVMIO


# --- structs -------------------------------------------------------------------------------------
class KvmDirtyLog(ctypes.Structure):
    """``struct kvm_dirty_log`` (KVM_GET_DIRTY_LOG): a slot and the address of a bitmap with
    one bit per page of it, which KVM fills (and clears in its own log)."""

    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32),
                ("dirty_bitmap", ctypes.c_uint64)]


#: ``KVM_APIC_REG_SIZE``, ``KVM_IOAPIC_NUM_PINS``, ``KVM_MAX_XCRS`` of ``<asm/kvm.h>``.
KVM_APIC_REG_SIZE: Final = 0x400
KVM_IOAPIC_NUM_PINS: Final = 24
KVM_MAX_XCRS: Final = 16

KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2
KVM_NR_IRQCHIPS: Final = 3


class KvmIrqchip(ctypes.Structure):
    """``struct kvm_irqchip``: one in-kernel interrupt controller (PIC master/slave, IOAPIC).

    The 512-byte union is kept opaque: a snapshot only moves it from KVM_GET_IRQCHIP to
    KVM_SET_IRQCHIP of the same chip id, and KVM validates what it reads back.
    """

    _fields_ = [("chip_id", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("chip", ctypes.c_char * 512)]


class KvmPitChannelState(ctypes.Structure):
    """``struct kvm_pit_channel_state``: one i8254 counter."""

    _fields_ = [
        ("count", ctypes.c_uint32),
        ("latched_count", ctypes.c_uint16),
        ("count_latched", ctypes.c_uint8),
        ("status_latched", ctypes.c_uint8),
        ("status", ctypes.c_uint8),
        ("read_state", ctypes.c_uint8),
        ("write_state", ctypes.c_uint8),
        ("write_latch", ctypes.c_uint8),
        ("rw_mode", ctypes.c_uint8),
        ("mode", ctypes.c_uint8),
        ("bcd", ctypes.c_uint8),
        ("gate", ctypes.c_uint8),
        ("count_load_time", ctypes.c_int64),
    ]


class KvmPitState2(ctypes.Structure):
    """``struct kvm_pit_state2`` (KVM_GET_PIT2 / KVM_SET_PIT2)."""

    _fields_ = [("channels", KvmPitChannelState * 3), ("flags", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32 * 9)]


class KvmXsave(ctypes.Structure):
    """``struct kvm_xsave``: the fixed 4 KiB of the XSAVE area (KVM_GET_XSAVE / KVM_SET_XSAVE).

    KVM_GET_XSAVE2 may write more (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM says how
    much): callers pass a larger buffer then, the request number keeps this size.
    """

    _fields_ = [("region", ctypes.c_uint32 * 1024)]


class KvmXcr(ctypes.Structure):
    """``struct kvm_xcr``: one extended control register (XCR0 is the one that exists)."""

    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("value", ctypes.c_uint64)]


class KvmXcrs(ctypes.Structure):
    """``struct kvm_xcrs`` (KVM_GET_XCRS / KVM_SET_XCRS)."""

    _fields_ = [("nr_xcrs", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("xcrs", KvmXcr * KVM_MAX_XCRS), ("padding", ctypes.c_uint64 * 16)]


# --- ioctls on a VM fd (irqchip, PIT, dirty log) and a vCPU fd (XSAVE, XCRS) -------------
KVM_GET_DIRTY_LOG: Final = iow(KVMIO, 0x42, ctypes.sizeof(KvmDirtyLog))
# KVM_SET_IRQCHIP really is _IOR in <linux/kvm.h> (a historical slip kept for the ABI).
KVM_GET_IRQCHIP: Final = iowr(KVMIO, 0x62, ctypes.sizeof(KvmIrqchip))
KVM_SET_IRQCHIP: Final = ior(KVMIO, 0x63, ctypes.sizeof(KvmIrqchip))
KVM_GET_PIT2: Final = ior(KVMIO, 0x9F, ctypes.sizeof(KvmPitState2))
KVM_SET_PIT2: Final = iow(KVMIO, 0xA0, ctypes.sizeof(KvmPitState2))
KVM_GET_XSAVE: Final = ior(KVMIO, 0xA4, ctypes.sizeof(KvmXsave))
KVM_SET_XSAVE: Final = iow(KVMIO, 0xA5, ctypes.sizeof(KvmXsave))
KVM_GET_XCRS: Final = ior(KVMIO, 0xA6, ctypes.sizeof(KvmXcrs))
KVM_SET_XCRS: Final = iow(KVMIO, 0xA7, ctypes.sizeof(KvmXcrs))
KVM_GET_XSAVE2: Final = ior(KVMIO, 0xCF, ctypes.sizeof(KvmXsave))

# --- capabilities and flags ---------------------------------------------------------------------
KVM_CAP_XSAVE2: Final = 208
#: ``kvm_clock_data.flags``.
KVM_CLOCK_TSC_STABLE: Final = 2
KVM_CLOCK_REALTIME: Final = 1 << 2
KVM_CLOCK_HOST_TSC: Final = 1 << 3

#: ``kvm_vcpu_events.flags`` on KVM_SET_VCPU_EVENTS: which optional fields to apply.
KVM_VCPUEVENT_VALID_NMI_PENDING: Final = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR: Final = 0x2
KVM_VCPUEVENT_VALID_SHADOW: Final = 0x4

# MSRs a snapshot carries (SDM vol. 4): the TSC, so the guest's rdtsc deltas stay sane across a
# restore, and the system-call, PAT and base MSRs a 64-bit guest may have set. EFER, FS/GS base
# travel in kvm_sregs.
X86_MSR_IA32_TSC: Final = 0x10
X86_MSR_IA32_SYSENTER_CS: Final = 0x174
X86_MSR_IA32_SYSENTER_ESP: Final = 0x175
X86_MSR_IA32_SYSENTER_EIP: Final = 0x176
X86_MSR_IA32_MISC_ENABLE: Final = 0x1A0
X86_MSR_IA32_CR_PAT: Final = 0x277
X86_MSR_STAR: Final = 0xC000_0081
X86_MSR_LSTAR: Final = 0xC000_0082
X86_MSR_CSTAR: Final = 0xC000_0083
X86_MSR_SYSCALL_MASK: Final = 0xC000_0084
X86_MSR_KERNEL_GS_BASE: Final = 0xC000_0102
X86_MSR_TSC_AUX: Final = 0xC000_0103
