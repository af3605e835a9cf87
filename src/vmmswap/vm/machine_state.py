"""Capture and restore a :class:`~vmmswap.vm.machine.Machine`'s vCPU and device state.

What is captured is what the micro-VM's guests can have changed: general and special
registers, the XSAVE area (or the legacy FPU state without KVM_CAP_XSAVE) and XCR0, the MSRs
of :data:`SNAPSHOT_MSRS` that KVM saves, pending-event state, the MP state, and -- only when
the machine has them -- the in-kernel local APICs, PIC/IOAPIC and PIT. The VM's kvmclock is
carried too, so time in the guest continues rather than restarting.

**When**: a vCPU's state is consistent only outside KVM_RUN and with no port-I/O exit waiting
to be completed by its next KVM_RUN. :func:`capture_vcpu` is therefore called on the vCPU's
own thread while it is parked at the built-in guest's command port, an ``in`` that has not
returned yet (see :meth:`~vmmswap.vm.workload.WorkloadDevice.park`): its RIP still points at
that instruction, which the restored guest simply executes again.

The order of the restore follows the dependencies KVM has: CPUID before anything (the
machine sets it at creation), special registers before the XSAVE area and MSRs (CR4 and EFER
decide which are valid), the LAPIC after the irqchip exists, events last.
"""

from __future__ import annotations

import logging
from typing import Final

from vmmswap.kernel import kvm as k
from vmmswap.kernel import kvm_state as ks
from vmmswap.vm.kvm import VcpuFd, VmFd
from vmmswap.vm.machine import Machine
from vmmswap.vm.vm_state import VcpuState, VmStateError

_log = logging.getLogger(__name__)

SNAPSHOT_MSRS: Final = (
    ks.X86_MSR_IA32_TSC, ks.X86_MSR_IA32_SYSENTER_CS, ks.X86_MSR_IA32_SYSENTER_ESP,
    ks.X86_MSR_IA32_SYSENTER_EIP, ks.X86_MSR_IA32_MISC_ENABLE, ks.X86_MSR_IA32_CR_PAT,
    ks.X86_MSR_STAR, ks.X86_MSR_LSTAR, ks.X86_MSR_CSTAR, ks.X86_MSR_SYSCALL_MASK,
    ks.X86_MSR_KERNEL_GS_BASE, ks.X86_MSR_TSC_AUX,
)


def snapshot_msrs(machine: Machine) -> list[int]:
    """The MSRs of :data:`SNAPSHOT_MSRS` this KVM saves and restores."""
    supported = set(machine.kvm.msr_index_list())
    return [msr for msr in SNAPSHOT_MSRS if msr in supported]


def capture_vcpu(vcpu: VcpuFd, *, xsave_size: int, msrs: list[int],
                 lapic: bool) -> VcpuState:
    """Read one vCPU's state (on its own thread, outside KVM_RUN: see the module docstring)."""
    state = VcpuState(
        index=vcpu.index, regs=bytes(vcpu.get_regs()), sregs=bytes(vcpu.get_sregs()),
        events=vcpu.get_vcpu_events(), mp_state=vcpu.get_mp_state(),
        msrs=vcpu.get_msrs(msrs) if msrs else {})
    missing = set(msrs) - set(state.msrs)
    if missing:
        raise OSError(f"KVM_GET_MSRS read {len(state.msrs)} of {len(msrs)} MSRs; refused: "
                      + ", ".join(f"{m:#x}" for m in sorted(missing)))
    if xsave_size:
        state.xsave = vcpu.get_xsave(xsave_size)
        state.xcrs = vcpu.get_xcrs()
    else:
        state.fpu = bytes(vcpu.get_fpu())
    if lapic:
        state.lapic = vcpu.get_lapic()
    return state


def restore_vcpu(vcpu: VcpuFd, state: VcpuState, *, xsave_size: int) -> None:
    """Load a captured state into a freshly created vCPU of a compatible machine."""
    if state.index != vcpu.index:
        raise VmStateError(f"state of vCPU {state.index} given to vCPU {vcpu.index}")
    vcpu.set_sregs(k.KvmSregs.from_buffer_copy(state.sregs))
    vcpu.set_regs(k.KvmRegs.from_buffer_copy(state.regs))
    if state.xsave is not None:
        if not xsave_size:
            raise VmStateError("the snapshot has an XSAVE area, this KVM lacks KVM_CAP_XSAVE")
        if len(state.xsave) > xsave_size:
            raise VmStateError(f"the snapshot's XSAVE area is {len(state.xsave)} bytes, this "
                               f"KVM takes {xsave_size}")
        vcpu.set_xsave(state.xsave + bytes(xsave_size - len(state.xsave)))
        if state.xcrs is not None:
            vcpu.set_xcrs(state.xcrs)
    elif state.fpu is not None:
        vcpu.set_fpu(k.KvmFpu.from_buffer_copy(state.fpu))
    if state.msrs:
        vcpu.set_msrs(state.msrs)
    if state.lapic is not None:
        vcpu.set_lapic(state.lapic)
    vcpu.set_mp_state(state.mp_state)
    events = k.KvmVcpuEvents.from_buffer_copy(state.events)
    events.flags = (ks.KVM_VCPUEVENT_VALID_NMI_PENDING | ks.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                    | ks.KVM_VCPUEVENT_VALID_SHADOW)
    vcpu.set_vcpu_events(bytes(events))


def capture_devices(vm: VmFd, *, irqchip: bool, pit: bool
                    ) -> tuple[int | None, list[bytes] | None, bytes | None]:
    """(kvmclock ns, the three irqchips, the PIT), each None where the VM has none."""
    clock = None
    if vm.check_extension(k.KVM_CAP_ADJUST_CLOCK):
        clock = int(vm.get_clock().clock)
    chips = ([vm.get_irqchip(c) for c in range(ks.KVM_NR_IRQCHIPS)] if irqchip else None)
    return clock, chips, vm.get_pit2() if pit else None


def restore_devices(vm: VmFd, *, clock_ns: int | None, irqchips: list[bytes] | None,
                    pit: bytes | None) -> None:
    """Load device state captured by :func:`capture_devices` (before any vCPU runs)."""
    for raw in irqchips or ():
        vm.set_irqchip(raw)
    if pit is not None:
        vm.set_pit2(pit)
    if clock_ns is not None:
        vm.set_clock(clock_ns)
