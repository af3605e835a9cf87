"""The Linux x86 boot protocol: the setup header, ``struct boot_params`` (the zero page), e820.

Written from the kernel's boot protocol document (``Documentation/arch/x86/boot.rst``) and its
zero-page table (``zero-page.rst``), which are the ABI ``arch/x86/include/uapi/asm/bootparam.h``
implements. Every struct is packed and little-endian, as in C, and its size is checked at import,
so a wrong field shows up here rather than as a guest that silently misreads its memory map.

Only what a 64-bit boot loader reads or writes is named; the BIOS-era fields a loader must leave
zero (screen_info, APM, EDD, EFI, ...) are kept as opaque byte arrays at their offsets.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final

# --- the bzImage file ----------------------------------------------------------------------------

#: A "sector" in the boot protocol is always 512 bytes, whatever the medium.
SECTOR_SIZE: Final = 512
#: Where the setup header starts, both in the bzImage file and in ``struct boot_params``.
SETUP_HEADER_OFFSET: Final = 0x1F1
#: The byte at this offset is the length of the header past 0x202 (the end of the jump).
SETUP_HEADER_LENGTH_BYTE: Final = 0x201
SETUP_HEADER_LENGTH_BASE: Final = 0x202
#: ``setup_sects == 0`` means 4, for compatibility with very old kernels.
DEFAULT_SETUP_SECTS: Final = 4
#: ``boot_flag``: the classic boot-sector signature.
BOOT_FLAG_MAGIC: Final = 0xAA55
#: ``header``: the bytes "HdrS", little-endian.
HDRS_MAGIC: Final = 0x53726448
#: 2.12 added ``xloadflags`` (XLF_KERNEL_64), which the 64-bit entry point is announced by.
MIN_PROTOCOL_64BIT: Final = 0x020C

#: A bzImage's protected-mode kernel is loaded at 1 MiB (the kernel relocates itself if needed).
BZIMAGE_LOAD_ADDRESS: Final = 0x100000
#: The 64-bit entry point is this far into the loaded protected-mode kernel.
ENTRY_64_OFFSET: Final = 0x200

#: ``type_of_loader``: a boot loader without an assigned ID.
LOADER_TYPE_UNDEFINED: Final = 0xFF

#: The boot GDT selectors both the 32- and 64-bit entry points require.
BOOT_CS: Final = 0x10
BOOT_DS: Final = 0x18


class LoadFlags(enum.IntFlag):
    """``loadflags`` (offset 0x211)."""

    LOADED_HIGH = 1 << 0  # protected-mode code is at 0x100000 (bzImage)
    KASLR = 1 << 1  # set by the kernel when it randomised its own address
    QUIET = 1 << 5  # suppress early messages
    KEEP_SEGMENTS = 1 << 6  # obsolete
    CAN_USE_HEAP = 1 << 7  # heap_end_ptr is valid


class XLoadFlags(enum.IntFlag):
    """``xloadflags`` (offset 0x236, protocol 2.12+)."""

    KERNEL_64 = 1 << 0  # has the legacy 64-bit entry point at +0x200
    CAN_BE_LOADED_ABOVE_4G = 1 << 1
    EFI_HANDOVER_32 = 1 << 2
    EFI_HANDOVER_64 = 1 << 3
    EFI_KEXEC = 1 << 4
    FIVE_LEVEL = 1 << 5
    FIVE_LEVEL_ENABLED = 1 << 6


class E820Type(enum.IntEnum):
    """``struct boot_e820_entry.type``."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5
    PMEM = 7
    PRAM = 12
    SOFT_RESERVED = 0xEFFFFFFF


class SetupDataType(enum.IntEnum):
    """``struct setup_data.type``: entries of the linked list at ``setup_data``."""

    NONE = 0
    E820_EXT = 1
    DTB = 2
    PCI = 3
    EFI = 4
    APPLE_PROPERTIES = 5
    JAILHOUSE = 6
    CC_BLOB = 7
    IMA = 8
    RNG_SEED = 9


# --- structs -------------------------------------------------------------------------------------


class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header``: at 0x1F1 of the bzImage and of ``struct boot_params``."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),  # 0x1F1
        ("root_flags", ctypes.c_uint16),  # 0x1F2
        ("syssize", ctypes.c_uint32),  # 0x1F4: protected-mode code size in 16-byte paragraphs
        ("ram_size", ctypes.c_uint16),  # 0x1F8
        ("vid_mode", ctypes.c_uint16),  # 0x1FA
        ("root_dev", ctypes.c_uint16),  # 0x1FC
        ("boot_flag", ctypes.c_uint16),  # 0x1FE: 0xAA55
        ("jump", ctypes.c_uint16),  # 0x200
        ("header", ctypes.c_uint32),  # 0x202: "HdrS"
        ("version", ctypes.c_uint16),  # 0x206
        ("realmode_swtch", ctypes.c_uint32),  # 0x208
        ("start_sys_seg", ctypes.c_uint16),  # 0x20C
        ("kernel_version", ctypes.c_uint16),  # 0x20E: offset of the version string - 0x200
        ("type_of_loader", ctypes.c_uint8),  # 0x210
        ("loadflags", ctypes.c_uint8),  # 0x211
        ("setup_move_size", ctypes.c_uint16),  # 0x212
        ("code32_start", ctypes.c_uint32),  # 0x214
        ("ramdisk_image", ctypes.c_uint32),  # 0x218
        ("ramdisk_size", ctypes.c_uint32),  # 0x21C
        ("bootsect_kludge", ctypes.c_uint32),  # 0x220
        ("heap_end_ptr", ctypes.c_uint16),  # 0x224
        ("ext_loader_ver", ctypes.c_uint8),  # 0x226
        ("ext_loader_type", ctypes.c_uint8),  # 0x227
        ("cmd_line_ptr", ctypes.c_uint32),  # 0x228
        ("initrd_addr_max", ctypes.c_uint32),  # 0x22C
        ("kernel_alignment", ctypes.c_uint32),  # 0x230
        ("relocatable_kernel", ctypes.c_uint8),  # 0x234
        ("min_alignment", ctypes.c_uint8),  # 0x235
        ("xloadflags", ctypes.c_uint16),  # 0x236
        ("cmdline_size", ctypes.c_uint32),  # 0x238
        ("hardware_subarch", ctypes.c_uint32),  # 0x23C
        ("hardware_subarch_data", ctypes.c_uint64),  # 0x240
        ("payload_offset", ctypes.c_uint32),  # 0x248
        ("payload_length", ctypes.c_uint32),  # 0x24C
        ("setup_data", ctypes.c_uint64),  # 0x250
        ("pref_address", ctypes.c_uint64),  # 0x258
        ("init_size", ctypes.c_uint32),  # 0x260: memory the kernel needs while decompressing
        ("handover_offset", ctypes.c_uint32),  # 0x264
        ("kernel_info_offset", ctypes.c_uint32),  # 0x268
    ]


class E820Entry(ctypes.LittleEndianStructure):
    """``struct boot_e820_entry``: one range of the firmware memory map."""

    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    ]


#: The zero page's own e820 table holds this many entries (more go in SETUP_E820_EXT).
E820_MAX_ENTRIES_ZEROPAGE: Final = 128


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params``: the zero page a loader hands the kernel (``rsi`` at entry)."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),  # 0x040
        ("_pad2", ctypes.c_uint8 * 4),  # 0x054
        ("tboot_addr", ctypes.c_uint64),  # 0x058
        ("ist_info", ctypes.c_uint8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad3", ctypes.c_uint8 * 8),  # 0x078
        ("hd0_info", ctypes.c_uint8 * 0x10),  # 0x080
        ("hd1_info", ctypes.c_uint8 * 0x10),  # 0x090
        ("sys_desc_table", ctypes.c_uint8 * 0x10),  # 0x0A0
        ("olpc_ofw_header", ctypes.c_uint8 * 0x10),  # 0x0B0
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0C0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0C4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0C8
        ("_pad4", ctypes.c_uint8 * 0x70),  # 0x0CC
        ("cc_blob_address", ctypes.c_uint32),  # 0x13C
        ("edid_info", ctypes.c_uint8 * 0x80),  # 0x140
        ("efi_info", ctypes.c_uint8 * 0x20),  # 0x1C0
        ("alt_mem_k", ctypes.c_uint32),  # 0x1E0
        ("scratch", ctypes.c_uint32),  # 0x1E4
        ("e820_entries", ctypes.c_uint8),  # 0x1E8
        ("eddbuf_entries", ctypes.c_uint8),  # 0x1E9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),  # 0x1EA
        ("kbd_status", ctypes.c_uint8),  # 0x1EB
        ("secure_boot", ctypes.c_uint8),  # 0x1EC
        ("_pad5", ctypes.c_uint8 * 2),  # 0x1ED
        ("sentinel", ctypes.c_uint8),  # 0x1EF: must stay zero (detects loaders that copy too much)
        ("_pad6", ctypes.c_uint8 * 1),  # 0x1F0
        ("hdr", SetupHeader),  # 0x1F1
        ("_pad7", ctypes.c_uint8 * 0x24),  # 0x26C
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),  # 0x290
        ("e820_table", E820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2D0
        ("_pad8", ctypes.c_uint8 * 0x30),  # 0xCD0
        ("eddbuf", ctypes.c_uint8 * 0x1EC),  # 0xD00
        ("_pad9", ctypes.c_uint8 * 0x114),  # 0xEEC
    ]


ZERO_PAGE_SIZE: Final = 0x1000
SETUP_HEADER_SIZE: Final = ctypes.sizeof(SetupHeader)


def _check_layout() -> None:
    """Fail at import if a struct disagrees with the documented offsets."""
    expected = {
        (SetupHeader, "kernel_info_offset"): 0x268 - SETUP_HEADER_OFFSET,
        (SetupHeader, "xloadflags"): 0x236 - SETUP_HEADER_OFFSET,
        (SetupHeader, "init_size"): 0x260 - SETUP_HEADER_OFFSET,
        (BootParams, "acpi_rsdp_addr"): 0x070,
        (BootParams, "ext_cmd_line_ptr"): 0x0C8,
        (BootParams, "cc_blob_address"): 0x13C,
        (BootParams, "e820_entries"): 0x1E8,
        (BootParams, "sentinel"): 0x1EF,
        (BootParams, "hdr"): SETUP_HEADER_OFFSET,
        (BootParams, "edd_mbr_sig_buffer"): 0x290,
        (BootParams, "e820_table"): 0x2D0,
        (BootParams, "eddbuf"): 0xD00,
    }
    for (struct, field), offset in expected.items():
        actual = getattr(struct, field).offset
        if actual != offset:
            raise ImportError(f"{struct.__name__}.{field} at {actual:#x}, expected {offset:#x}")
    sizes = {SetupHeader: 0x26C - SETUP_HEADER_OFFSET, E820Entry: 20, BootParams: ZERO_PAGE_SIZE}
    for struct, size in sizes.items():
        if ctypes.sizeof(struct) != size:
            raise ImportError(
                f"sizeof({struct.__name__}) = {ctypes.sizeof(struct)}, expected {size}")


_check_layout()
