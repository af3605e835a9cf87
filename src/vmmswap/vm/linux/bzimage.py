"""Parse a bzImage: check it can be booted through the 64-bit entry point, and split it.

A bzImage is the real-mode setup code (boot sector plus ``setup_sects`` sectors, holding the setup
header at 0x1F1) followed by the protected-mode kernel (a self-decompressing stub). A 64-bit loader
never runs the real-mode part: it copies the setup header into the zero page and loads the
protected-mode part at 1 MiB (see :mod:`vmmswap.kernel.bootparam`).

The protected-mode part is itself a decompressor wrapped around the compressed kernel ELF (the
"payload", located by ``payload_offset``/``payload_length``). :meth:`BzImage.vmlinux` unpacks
that payload on the host, which lets the loader skip the in-guest decompression: on hosts where
KVM emulates guest kernel code (PVM) running the decompressor takes minutes.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmmswap.kernel import bootparam as bp


class BzImageError(ValueError):
    """The file is not a bzImage this loader can boot; the message says which check failed."""


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage.

    ``header`` is the setup header exactly as the file has it (fields past the end the kernel
    declares are zero), ``protected_mode`` the bytes to load at :data:`bp.BZIMAGE_LOAD_ADDRESS`.
    """

    header: bp.SetupHeader
    header_length: int
    protected_mode: bytes
    version: str

    @classmethod
    def parse(cls, data: bytes) -> BzImage:
        """Validate ``data`` as a 64-bit-bootable bzImage; raise BzImageError if it is not."""
        if len(data) < bp.SETUP_HEADER_LENGTH_BASE + 1:
            raise BzImageError(f"{len(data)} bytes is too short for a bzImage setup header")
        header_end = bp.SETUP_HEADER_LENGTH_BASE + data[bp.SETUP_HEADER_LENGTH_BYTE]
        header_length = min(header_end, bp.SETUP_HEADER_OFFSET + bp.SETUP_HEADER_SIZE)
        header_length -= bp.SETUP_HEADER_OFFSET
        raw = data[bp.SETUP_HEADER_OFFSET:bp.SETUP_HEADER_OFFSET + header_length]
        header = bp.SetupHeader.from_buffer_copy(raw.ljust(bp.SETUP_HEADER_SIZE, b"\0"))

        if header.boot_flag != bp.BOOT_FLAG_MAGIC:
            raise BzImageError(
                f"boot_flag is {header.boot_flag:#06x}, not 0xaa55: not a kernel image")
        if header.header != bp.HDRS_MAGIC:
            raise BzImageError("no 'HdrS' signature: the kernel predates boot protocol 2.00")
        if header.version < bp.MIN_PROTOCOL_64BIT:
            raise BzImageError(
                f"boot protocol {header.version >> 8}.{header.version & 0xFF:02d} is older than "
                f"2.12, which announces the 64-bit entry point"
            )
        if not header.loadflags & bp.LoadFlags.LOADED_HIGH:
            raise BzImageError("loadflags lack LOADED_HIGH: a zImage, not a bzImage")
        if not header.xloadflags & bp.XLoadFlags.KERNEL_64:
            raise BzImageError("xloadflags lack XLF_KERNEL_64: no 64-bit entry point")

        setup_sects = header.setup_sects or bp.DEFAULT_SETUP_SECTS
        pm_offset = (setup_sects + 1) * bp.SECTOR_SIZE
        if pm_offset >= len(data):
            raise BzImageError(
                f"setup_sects {setup_sects} puts the protected-mode kernel at {pm_offset:#x}, "
                f"past the end of the {len(data)}-byte file"
            )
        protected_mode = data[pm_offset:]
        declared = header.syssize * 16
        if declared > len(protected_mode):
            raise BzImageError(
                f"syssize declares {declared} bytes of protected-mode kernel, the file has "
                f"{len(protected_mode)}: truncated image"
            )
        return cls(header, header_length, protected_mode, _version_string(data, header))

    @classmethod
    def load(cls, path: str | Path) -> BzImage:
        """Read and parse the bzImage at ``path``."""
        try:
            return cls.parse(Path(path).read_bytes())
        except BzImageError as exc:
            raise BzImageError(f"{path}: {exc}") from None

    @property
    def header_bytes(self) -> bytes:
        """The setup header as it goes into the zero page (only the part the kernel declared)."""
        return bytes(self.header)[:self.header_length]

    @property
    def init_size(self) -> int:
        """Memory, from the load address, the kernel uses while it decompresses itself."""
        return max(int(self.header.init_size), len(self.protected_mode))

    @property
    def cmdline_limit(self) -> int:
        """The longest command line (without its NUL) the kernel accepts."""
        # Protocol 2.06 added cmdline_size; before it the limit was 255.
        return int(self.header.cmdline_size) if self.header.version >= 0x0206 else 255


    @property
    def payload(self) -> bytes:
        """The compressed kernel ELF inside the protected-mode part."""
        start = int(self.header.payload_offset)
        end = start + int(self.header.payload_length)
        if self.header.version < 0x0208 or not self.header.payload_length \
                or end > len(self.protected_mode):
            raise BzImageError("the image declares no usable payload (boot protocol 2.08+)")
        return self.protected_mode[start:end]

    def vmlinux(self) -> bytes:
        """The uncompressed kernel ELF (what ``scripts/extract-vmlinux`` gives).

        Handles the compressions Python's standard library reads (xz, lzma, gzip, bzip2);
        BzImageError names the magic of any other.
        """
        payload = self.payload
        try:
            if payload.startswith(_XZ_MAGIC):
                return _one_stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), payload)
            if payload.startswith(_GZIP_MAGIC):
                # The kernel appends its uncompressed size after the gzip stream: decode the
                # one stream and ignore what follows.
                return _one_stream(zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), payload)
            if payload.startswith(_BZIP2_MAGIC):
                return _one_stream(bz2.BZ2Decompressor(), payload)
            if payload.startswith(_LZMA_MAGIC):
                return _one_stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), payload)
        except (lzma.LZMAError, OSError, EOFError, ValueError, zlib.error) as exc:
            raise BzImageError(f"the kernel payload does not decompress: {exc}") from None
        raise BzImageError(f"kernel payload compressed with an unsupported method "
                           f"(magic {payload[:6].hex()}): only xz, lzma, gzip and bzip2 are read")


class _Decompressor(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


def _one_stream(decompressor: _Decompressor, payload: bytes) -> bytes:
    """Decode the first compressed stream of ``payload``.

    The kernel appends the uncompressed size (4 bytes) after the stream; it is not a second
    stream, so whatever follows the first end-of-stream marker is ignored. A stream that ends
    early is an error: a truncated kernel must not load.
    """
    data = decompressor.decompress(payload)
    if not getattr(decompressor, "eof", True):
        raise EOFError("the compressed kernel ends before its end-of-stream marker")
    return data


_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_LZMA_MAGIC = b"\x5d\x00\x00"


def _version_string(data: bytes, header: bp.SetupHeader) -> str:
    """The "6.1.0-... (builder) #1 SMP ..." string ``kernel_version`` points to, or ""."""
    if not header.kernel_version:
        return ""
    start = header.kernel_version + 0x200
    end = data.find(b"\0", start, start + 512)
    if end < 0:
        return ""
    return data[start:end].decode("ascii", "replace")

