"""Load a 64-bit boot-protocol image that is not Linux (memtest86+) with the protocol alone.

memtest86+x64.bin speaks boot protocol 2.12 and has no compressed payload: its protected-mode
part is loaded as is at ``code32_start`` (1 MiB) and entered at load address + 0x200, the 64-bit
entry the protocol defines. Its header declares ``syssize`` rounded up past the end of the file
(8 bytes for Debian's 6.10); real boot loaders read what is there and zero the rest, so this
loader pads the file with zeros up to the declared size, and only that far (a file short by more
than the rounding is still rejected as truncated by :class:`BzImage`).
"""

from __future__ import annotations

import os
from pathlib import Path

from vmmswap.kernel import bootparam as bp
from vmmswap.vm.linux.bzimage import BzImage, BzImageError

IMAGE_NAME = "memtest86+x64.bin"
#: The 64-bit entry point sits this far past the protected-mode load address.
ENTRY_64_OFFSET = 0x200
#: syssize counts 16-byte paragraphs; a loader tolerates the rounding and no more.
_SYSSIZE_UNIT = 16


def cache_dir() -> Path:
    """Where ``scripts/fetch-memtest.sh`` leaves the image."""
    configured = os.environ.get("VMMSWAP_MEMTEST_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vmmswap" / "memtest"


def find_image(directory: Path | None = None) -> Path:
    """The cached image; FileNotFoundError saying how to fetch it."""
    path = (directory if directory is not None else cache_dir()) / IMAGE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"memtest86+ image missing ({path}): run "
                                "`bash scripts/fetch-memtest.sh` (needs apt-get)")
    return path


def pad_to_syssize(data: bytes) -> bytes:
    """``data`` with zeros appended up to the size its header declares, if short by < 16 bytes."""
    if len(data) <= bp.SETUP_HEADER_OFFSET + bp.SETUP_HEADER_SIZE:
        return data
    header = bp.SetupHeader.from_buffer_copy(
        data[bp.SETUP_HEADER_OFFSET:bp.SETUP_HEADER_OFFSET + bp.SETUP_HEADER_SIZE])
    setup_sects = header.setup_sects or bp.DEFAULT_SETUP_SECTS
    wanted = (setup_sects + 1) * bp.SECTOR_SIZE + header.syssize * _SYSSIZE_UNIT
    if 0 < wanted - len(data) < _SYSSIZE_UNIT:
        return data + bytes(wanted - len(data))
    return data


def parse_image(data: bytes) -> BzImage:
    """Validate ``data`` as a 64-bit boot-protocol image (BzImageError names the failed check)."""
    image = BzImage.parse(pad_to_syssize(data))
    if image.header.code32_start < 0x100000:
        raise BzImageError(f"code32_start {image.header.code32_start:#x} is below 1 MiB")
    return image


def load_image(path: Path) -> BzImage:
    try:
        return parse_image(path.read_bytes())
    except BzImageError as exc:
        raise BzImageError(f"{path}: {exc}") from None


def entry_point(image: BzImage) -> int:
    """Where the 64-bit boot vCPU starts: the protected-mode load address + 0x200."""
    return int(image.header.code32_start) + ENTRY_64_OFFSET
