"""Synthetic boot images for the Linux-loader unit tests (no download needed)."""

from __future__ import annotations

import lzma
import struct

from vmmswap.kernel import bootparam as bp

SETUP_SECTS = 4
PM_OFFSET = (SETUP_SECTS + 1) * bp.SECTOR_SIZE


def make_elf(segments: list[tuple[int, bytes, int]], entry: int) -> bytes:
    """An x86-64 ET_EXEC ELF with one PT_LOAD per ``(paddr, data, mem_size)``."""
    phoff = 64
    data_at = phoff + 56 * len(segments)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56,
                          len(segments), 64, 0, 0)
    phdrs = b""
    blobs = b""
    for paddr, blob, mem_size in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_at + len(blobs), 0xFFFFFFFF80000000 + paddr,
                             paddr, len(blob), mem_size, 0x1000)
        blobs += blob
    return header + phdrs + blobs


def make_bzimage(*, version: int = 0x020F, xloadflags: int = bp.XLoadFlags.KERNEL_64,
                 payload: bytes | None = None, cmdline_size: int = 2047) -> bytes:
    """A bzImage whose payload is an xz-compressed ELF (as Debian's)."""
    if payload is None:
        elf = make_elf([(0x1000000, b"\x90" * 64 + bytes(8192) + b"\xcc", 0x4000)], 0x1000000)
        payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
        payload += struct.pack("<I", len(elf))
    stub = b"\xeb\xfe" * 64  # the decompressor, never run by this loader
    protected = stub + payload
    image = bytearray(PM_OFFSET)
    hdr = bp.SetupHeader(
        setup_sects=SETUP_SECTS, syssize=len(protected) // 16, boot_flag=bp.BOOT_FLAG_MAGIC,
        jump=0x66EB, header=bp.HDRS_MAGIC, version=version, kernel_version=0x100,
        loadflags=bp.LoadFlags.LOADED_HIGH, initrd_addr_max=0x7FFFFFFF,
        kernel_alignment=0x200000, relocatable_kernel=1, xloadflags=xloadflags,
        cmdline_size=cmdline_size, payload_offset=len(stub), payload_length=len(payload),
        init_size=0x3000000,
    )
    raw = bytes(hdr)
    image[bp.SETUP_HEADER_OFFSET:bp.SETUP_HEADER_OFFSET + len(raw)] = raw
    image[bp.SETUP_HEADER_LENGTH_BYTE] = 0x6A  # header ends at 0x26C
    image[0x300:0x310] = b"6.1.0-test\0".ljust(16, b"\0")
    return bytes(image) + protected
