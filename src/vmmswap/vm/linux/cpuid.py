"""The CPUID a Linux guest sees: KVM's supported leaves, per-vCPU topology, minus a few features.

:class:`~vmmswap.vm.machine.Machine` already sets KVM_GET_SUPPORTED_CPUID with the APIC ID
patched into leaves 1, 0xB and 0x1F. A real kernel reads more than that, so this module sets the
table again, before any vCPU runs, with:

* the APIC ID also in AMD's extended topology leaf 0x8000001E, so both vendors' topology code
  sees distinct CPUs;
* features hidden that some KVM back ends cannot run in guest kernel mode. On hosts where KVM
  emulates guest supervisor code instruction by instruction (software virtualization such as
  PVM, where there is no VMX/SVM), the emulator lacks CMPXCHG16B, which Linux's SLUB allocator
  uses whenever CPUID offers it; without the bit the kernel falls back to a lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from vmmswap.kernel import kvm as k
from vmmswap.vm.kvm import Kvm, VcpuFd

#: CPUID.1:ECX bit 13, CMPXCHG16B.
CPUID_1_ECX_CX16: Final = 1 << 13
#: CPUID.1:ECX bits 26/27, XSAVE and OSXSAVE.
CPUID_1_ECX_XSAVE: Final = 1 << 26
CPUID_1_ECX_OSXSAVE: Final = 1 << 27
#: Leaf 1 ECX bits hidden from the guest.
HIDDEN_LEAF1_ECX: Final = CPUID_1_ECX_CX16 | CPUID_1_ECX_XSAVE | CPUID_1_ECX_OSXSAVE

_LEAF_FEATURES = 0x1
_LEAF_TOPOLOGY = (0xB, 0x1F)
_LEAF_AMD_TOPOLOGY = 0x8000_001E


def guest_cpuid(supported: Iterable[k.KvmCpuidEntry2], apic_id: int) -> list[k.KvmCpuidEntry2]:
    """A copy of ``supported`` adjusted for the vCPU with ``apic_id`` (see the module doc)."""
    entries = [k.KvmCpuidEntry2.from_buffer_copy(entry) for entry in supported]
    for entry in entries:
        if entry.function == _LEAF_FEATURES:
            entry.ebx = (entry.ebx & 0x00FF_FFFF) | (apic_id << 24)
            entry.ecx = (entry.ecx | k.X86_CPUID_HYPERVISOR_ECX) & ~HIDDEN_LEAF1_ECX
        elif entry.function in _LEAF_TOPOLOGY:
            entry.edx = apic_id
        elif entry.function == _LEAF_AMD_TOPOLOGY:
            entry.eax = apic_id
    return entries


def set_guest_cpuid(kvm: Kvm, vcpus: Iterable[VcpuFd]) -> None:
    """Give every vCPU its :func:`guest_cpuid` (vCPU index = APIC ID); before the first run."""
    supported = kvm.supported_cpuid()
    for vcpu in vcpus:
        vcpu.set_cpuid2(guest_cpuid(supported, vcpu.index))
