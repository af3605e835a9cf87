"""bzImage parsing and payload extraction, on synthetic images."""

from __future__ import annotations

import gzip
import struct

import pytest
from linux_helpers import PM_OFFSET, make_bzimage, make_elf

from vmmswap.kernel import bootparam as bp
from vmmswap.vm.linux.bzimage import BzImage, BzImageError
from vmmswap.vm.linux.elf import ElfError, KernelElf


def test_parse_reads_header_and_splits_protected_mode() -> None:
    data = make_bzimage()
    image = BzImage.parse(data)
    assert image.header.version == 0x020F
    assert image.protected_mode == data[PM_OFFSET:]
    assert image.version == "6.1.0-test"
    assert image.header_length == 0x26C - bp.SETUP_HEADER_OFFSET
    assert image.cmdline_limit == 2047


def test_vmlinux_from_xz_payload_is_the_elf() -> None:
    elf = KernelElf.parse(BzImage.parse(make_bzimage()).vmlinux())
    assert elf.entry == 0x1000000
    assert elf.segments[0].paddr == 0x1000000
    assert elf.end == 0x1004000


def test_vmlinux_from_gzip_payload_ignores_trailing_size() -> None:
    body = make_elf([(0x200000, b"abc", 0x1000)], 0x200000)
    payload = gzip.compress(body, mtime=0) + struct.pack("<I", len(body))
    assert BzImage.parse(make_bzimage(payload=payload)).vmlinux() == body


def test_truncated_payload_is_an_error() -> None:
    good = BzImage.parse(make_bzimage()).payload
    with pytest.raises(BzImageError, match="decompress"):
        BzImage.parse(make_bzimage(payload=good[: len(good) // 2])).vmlinux()


def test_unknown_compression_is_named() -> None:
    with pytest.raises(BzImageError, match="unsupported method"):
        BzImage.parse(make_bzimage(payload=b"(\xb5/\xfd" + bytes(64))).vmlinux()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({0x1FE: b"\0\0"}, "boot_flag"),
        ({0x202: b"XXXX"}, "HdrS"),
        ({0x206: struct.pack("<H", 0x0206)}, "older than"),
        ({0x211: b"\0"}, "LOADED_HIGH"),
        ({0x236: b"\0\0"}, "XLF_KERNEL_64"),
    ],
)
def test_rejects_images_it_cannot_boot(patch: dict[int, bytes], message: str) -> None:
    data = bytearray(make_bzimage())
    for offset, raw in patch.items():
        data[offset:offset + len(raw)] = raw
    with pytest.raises(BzImageError, match=message):
        BzImage.parse(bytes(data))


def test_rejects_short_and_truncated_files() -> None:
    with pytest.raises(BzImageError, match="too short"):
        BzImage.parse(b"\0" * 100)
    with pytest.raises(BzImageError, match="truncated"):
        BzImage.parse(make_bzimage()[:PM_OFFSET + 100])


def test_elf_rejects_non_x86_64() -> None:
    elf = bytearray(make_elf([(0x1000, b"x", 0x1000)], 0x1000))
    elf[18:20] = struct.pack("<H", 183)  # aarch64
    with pytest.raises(ElfError, match="x86-64"):
        KernelElf.parse(bytes(elf))


def test_elf_rejects_entry_outside_segments() -> None:
    with pytest.raises(ElfError, match="entry point"):
        KernelElf.parse(make_elf([(0x1000, b"x", 0x1000)], 0x9000))


def test_elf_rejects_truncated_segment() -> None:
    elf = make_elf([(0x1000, b"x" * 100, 0x1000)], 0x1000)
    with pytest.raises(ElfError, match="truncated"):
        KernelElf.parse(elf[:-50])
