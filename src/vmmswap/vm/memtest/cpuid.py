"""The CPUID memtest86+ sees: the Linux guest's table with a vendor memtest has no driver for.

memtest reads the CPU temperature through vendor-specific code right at startup: on an AMD
vendor string it computes the value with x87 instructions (``fldz``, ``fimul``, ``fistp``),
which PVM's instruction emulator does not implement, and on Intel's it reads MSR 0x19C. With
any other vendor string its temperature function returns 0 and nothing else changes what it
tests. The string chosen names this VMM.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from vmmswap.kernel import kvm as k
from vmmswap.vm.kvm import Kvm, VcpuFd
from vmmswap.vm.linux.cpuid import guest_cpuid

#: 12 bytes, as CPUID.0 returns them in EBX, EDX, ECX; starts with neither 'G' nor 'A'.
VENDOR: Final = b"VmmSwapVCPU!"
_LEAF_VENDOR = 0x0


def vendor_registers(vendor: bytes) -> tuple[int, int, int]:
    """(EBX, EDX, ECX) spelling the 12-byte ``vendor``."""
    if len(vendor) != 12:
        raise ValueError(f"a CPUID vendor is 12 bytes, not {len(vendor)}")
    ebx, edx, ecx = struct.unpack("<III", vendor)
    return ebx, edx, ecx


def memtest_cpuid(supported: Iterable[k.KvmCpuidEntry2], apic_id: int) -> list[k.KvmCpuidEntry2]:
    entries = guest_cpuid(supported, apic_id)
    ebx, edx, ecx = vendor_registers(VENDOR)
    for entry in entries:
        if entry.function == _LEAF_VENDOR:
            entry.ebx, entry.edx, entry.ecx = ebx, edx, ecx
    return entries


def set_memtest_cpuid(kvm: Kvm, vcpus: Iterable[VcpuFd]) -> None:
    """Give every vCPU its :func:`memtest_cpuid` (vCPU index = APIC ID); before the first run."""
    supported = kvm.supported_cpuid()
    for vcpu in vcpus:
        vcpu.set_cpuid2(memtest_cpuid(supported, vcpu.index))
