"""The newc archive writer, checked with a small reader of the kernel's format."""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

import pytest

from vmmswap.vm.linux import initramfs


def read_newc(archive: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    """name -> (mode, data, rdev major, rdev minor), stopping at the trailer."""
    members: dict[str, tuple[int, bytes, int, int]] = {}
    at = 0
    while True:
        assert archive[at:at + 6] == b"070701"
        fields = [int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_at = at + 110
        name = archive[name_at:name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, archive[data_at:data_at + size], rmaj, rmin)
        at = data_at + size + (-size % 4)


def test_roundtrip_of_files_dirs_links_and_devices() -> None:
    entries = initramfs.guest_entries(b"\x7fELF-busybox", b"#!/bin/sh\necho hi\n")
    members = read_newc(initramfs.write_newc(entries))
    assert stat.S_ISDIR(members["dev"][0])
    assert members["bin/busybox"][1] == b"\x7fELF-busybox"
    assert stat.S_ISLNK(members["bin/sh"][0]) and members["bin/sh"][1] == b"busybox"
    mode, _, major, minor = members["dev/console"]
    assert stat.S_ISCHR(mode) and (major, minor) == (5, 1)
    assert members["init"][0] & 0o111 and members["init"][1].startswith(b"#!/bin/sh")


def test_archive_is_aligned_and_deterministic() -> None:
    entries = initramfs.guest_entries(b"x" * 5, b"y" * 7)
    first = initramfs.write_newc(entries)
    assert first == initramfs.write_newc(entries)
    assert len(first) % 4 == 0


def test_absolute_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="relative"):
        initramfs.write_newc([initramfs.Entry("/init", stat.S_IFREG | 0o755)])


def test_build_writes_gzip_and_main_reports_missing_input(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"bb")
    init = tmp_path / "init.sh"
    init.write_text("#!/bin/sh\n")
    out = tmp_path / "initramfs.cpio.gz"
    initramfs.build(busybox, init, out)
    assert "init" in read_newc(gzip.decompress(out.read_bytes()))
    assert initramfs.main(["--busybox", str(tmp_path / "nope"), "--init", str(init),
                           "--output", str(out)]) == 1


def test_packaged_init_script_speaks_the_protocol() -> None:
    script = (Path(initramfs.__file__).parent / "init.sh").read_text()
    for word in ("VMMSWAP-READY", "VMMSWAP-SHA256", "VMMSWAP-PONG", "/dev/port", "sha256sum"):
        assert word in script
