"""Build the MP table that tells a guest booted with ``acpi=off`` about its CPUs and I/O APIC.

The table matches KVM's in-kernel irqchip: local APIC IDs are the vCPU indexes, the I/O APIC
(24 pins) gets the next ID, and ISA IRQ *n* is wired to I/O APIC pin *n*, which is how KVM's
default GSI routing delivers ``KVM_IRQ_LINE(n)`` and its PIT's IRQ 0. LINT0 of every local APIC
receives the 8259's ExtINT and LINT1 the NMI, as on a PC.
"""

from __future__ import annotations

import ctypes

from vmmswap.kernel import mptable as mp

#: Room for the whole table: from the floating pointer up to the end of conventional memory.
MPTABLE_MAX_SIZE = 0x400
ISA_BUS_ID = 0
ISA_IRQS = 16
#: CPUID leaf 1 EDX bits a processor entry claims (FPU, APIC), for the kernel's printout only.
_CPU_FEATURES = (1 << 0) | (1 << 9)
_CPU_SIGNATURE = 0x600  # family 6: the table's signature field is informational


def _checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to zero modulo 256."""
    return -sum(data) & 0xFF


def _entries(num_cpus: int) -> list[ctypes.Structure]:
    ioapic_id = num_cpus
    entries: list[ctypes.Structure] = []
    for cpu in range(num_cpus):
        flags = mp.CpuFlags.ENABLED | (mp.CpuFlags.BOOT_PROCESSOR if cpu == 0 else 0)
        entries.append(mp.MpProcessor(
            type=mp.EntryType.PROCESSOR, apicid=cpu, apicver=mp.LAPIC_VERSION, cpuflag=flags,
            cpufeature=_CPU_SIGNATURE, featureflag=_CPU_FEATURES,
        ))
    entries.append(mp.MpBus(type=mp.EntryType.BUS, busid=ISA_BUS_ID, bustype=mp.BUS_TYPE_ISA))
    entries.append(mp.MpIoApic(type=mp.EntryType.IOAPIC, apicid=ioapic_id,
                               apicver=mp.IOAPIC_VERSION, flags=1,
                               apicaddr=mp.IOAPIC_DEFAULT_BASE))
    for irq in range(ISA_IRQS):
        entries.append(mp.MpInterrupt(
            type=mp.EntryType.IO_INTERRUPT, irqtype=mp.InterruptType.INT,
            irqflag=mp.IRQ_FLAGS_CONFORMING, srcbus=ISA_BUS_ID, srcbusirq=irq,
            dstapic=ioapic_id, dstirq=irq,
        ))
    for lint, kind in ((0, mp.InterruptType.EXTINT), (1, mp.InterruptType.NMI)):
        entries.append(mp.MpInterrupt(
            type=mp.EntryType.LOCAL_INTERRUPT, irqtype=kind, irqflag=mp.IRQ_FLAGS_CONFORMING,
            srcbus=ISA_BUS_ID, srcbusirq=0, dstapic=mp.ALL_LOCAL_APICS, dstirq=lint,
        ))
    return entries


def build_mptable(address: int, num_cpus: int) -> bytes:
    """The floating pointer at ``address`` followed by the configuration table.

    ValueError if the CPU count does not fit the local APIC ID space or the table would not
    fit in :data:`MPTABLE_MAX_SIZE` bytes.
    """
    if not 1 <= num_cpus < 0xFF:
        raise ValueError(f"{num_cpus} vCPUs: the MP table holds 1 to 254 (8-bit APIC IDs)")
    if address % 16:
        raise ValueError(f"MP floating pointer address {address:#x} is not 16-byte aligned")
    body = b"".join(bytes(entry) for entry in _entries(num_cpus))
    config_addr = address + ctypes.sizeof(mp.MpFloatingPointer)
    config = mp.MpConfigTable(
        signature=mp.MPC_SIGNATURE, length=ctypes.sizeof(mp.MpConfigTable) + len(body),
        spec=mp.MP_SPEC_REV, oem=b"VMMSWAP", productid=b"MICROVM",
        count=num_cpus + 2 + ISA_IRQS + 2, lapic=mp.LAPIC_DEFAULT_BASE,
    )
    config.checksum = _checksum(bytes(config) + body)
    pointer = mp.MpFloatingPointer(signature=mp.MPF_SIGNATURE, physptr=config_addr, length=1,
                                   specification=mp.MP_SPEC_REV)
    pointer.checksum = _checksum(bytes(pointer))
    table = bytes(pointer) + bytes(config) + body
    if len(table) > MPTABLE_MAX_SIZE:
        raise ValueError(f"an MP table for {num_cpus} vCPUs needs {len(table)} bytes, "
                         f"more than the {MPTABLE_MAX_SIZE} reserved for it")
    return table
