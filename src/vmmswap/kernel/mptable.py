"""The Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs.

Linux, booted with ``acpi=off``, scans low memory for the MP floating pointer ("_MP_") and reads
from its configuration table ("PCMP") which local APIC IDs exist, where the I/O APIC is and how
ISA interrupts reach it. Without the table it sees only the boot CPU. Every struct here is packed
and little-endian, and its size is checked at import.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final

MPF_SIGNATURE: Final = b"_MP_"
MPC_SIGNATURE: Final = b"PCMP"
#: Specification revision 1.4.
MP_SPEC_REV: Final = 4

#: Where the local APICs and the I/O APIC sit in the physical address space (KVM's defaults).
LAPIC_DEFAULT_BASE: Final = 0xFEE0_0000
IOAPIC_DEFAULT_BASE: Final = 0xFEC0_0000
#: KVM's in-kernel local APIC and I/O APIC report these versions (integrated APIC, 24 pins).
LAPIC_VERSION: Final = 0x14
IOAPIC_VERSION: Final = 0x11
IOAPIC_PINS: Final = 24

#: The areas Linux scans for the floating pointer, besides the EBDA named by the BDA.
MP_SCAN_BASE_MEMORY_TOP_KIB: Final = 639


class EntryType(enum.IntEnum):
    """The first byte of each configuration-table entry."""

    PROCESSOR = 0
    BUS = 1
    IOAPIC = 2
    IO_INTERRUPT = 3
    LOCAL_INTERRUPT = 4


class CpuFlags(enum.IntFlag):
    ENABLED = 1 << 0
    BOOT_PROCESSOR = 1 << 1


class InterruptType(enum.IntEnum):
    """``irqtype`` of an interrupt assignment entry."""

    INT = 0  # vectored, from the I/O APIC redirection table
    NMI = 1
    SMI = 2
    EXTINT = 3  # from an 8259A-compatible PIC


#: ``irqflag`` 0: polarity and trigger "conform to the bus" (edge, active high for ISA).
IRQ_FLAGS_CONFORMING: Final = 0
#: Destination "all local APICs" for a local interrupt entry.
ALL_LOCAL_APICS: Final = 0xFF
BUS_TYPE_ISA: Final = b"ISA   "


class MpFloatingPointer(ctypes.LittleEndianStructure):
    """The 16-byte floating pointer structure, which the guest finds by its signature."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("physptr", ctypes.c_uint32),  # address of the configuration table
        ("length", ctypes.c_uint8),  # in 16-byte units: 1
        ("specification", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("feature1", ctypes.c_uint8),  # 0: a configuration table is present
        ("feature2", ctypes.c_uint8),
        ("feature3", ctypes.c_uint8 * 3),
    ]


class MpConfigTable(ctypes.LittleEndianStructure):
    """The configuration table header; ``count`` entries follow it."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint16),  # header and entries, in bytes
        ("spec", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem", ctypes.c_char * 8),
        ("productid", ctypes.c_char * 12),
        ("oemptr", ctypes.c_uint32),
        ("oemsize", ctypes.c_uint16),
        ("count", ctypes.c_uint16),
        ("lapic", ctypes.c_uint32),
        ("extended_length", ctypes.c_uint16),
        ("extended_checksum", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
    ]


class MpProcessor(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("cpuflag", ctypes.c_uint8),
        ("cpufeature", ctypes.c_uint32),  # CPUID leaf 1 EAX (family/model/stepping)
        ("featureflag", ctypes.c_uint32),  # CPUID leaf 1 EDX
        ("reserved", ctypes.c_uint32 * 2),
    ]


class MpBus(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("busid", ctypes.c_uint8),
        ("bustype", ctypes.c_char * 6),
    ]


class MpIoApic(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),  # bit 0: enabled
        ("apicaddr", ctypes.c_uint32),
    ]


class MpInterrupt(ctypes.LittleEndianStructure):
    """An I/O (type 3) or local (type 4) interrupt assignment: same layout."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("irqtype", ctypes.c_uint8),
        ("irqflag", ctypes.c_uint16),
        ("srcbus", ctypes.c_uint8),
        ("srcbusirq", ctypes.c_uint8),
        ("dstapic", ctypes.c_uint8),
        ("dstirq", ctypes.c_uint8),
    ]


def _check_layout() -> None:
    sizes = {
        MpFloatingPointer: 16, MpConfigTable: 44, MpProcessor: 20, MpBus: 8, MpIoApic: 8,
        MpInterrupt: 8,
    }
    for struct, size in sizes.items():
        if ctypes.sizeof(struct) != size:
            raise ImportError(
                f"sizeof({struct.__name__}) = {ctypes.sizeof(struct)}, expected {size}")


_check_layout()
