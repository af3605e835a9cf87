"""Build the Linux guest's initramfs: a gzip-compressed cpio "newc" archive.

The archive is written here instead of by the ``cpio`` tool so that the setup step needs nothing
beyond Python and dpkg-deb, so that device nodes (``/dev/console``) can be put in it without root,
and so that the output is reproducible (every mtime is zero). This module uses the standard
library only: ``scripts/fetch-linux-guest.sh`` runs it by path, before the package is installed.

The kernel's side of the format is ``usr/initramfs_*`` and ``init/initramfs.c``: a sequence of
110-byte ASCII headers, each followed by the NUL-terminated name and the file data, both padded
to a 4-byte boundary, closed by an entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_ALIGN = 4

#: Applets linked at build time, so the init script can start before ``busybox --install``.
CORE_APPLETS = ("sh", "mount", "mkdir", "cat", "echo")

#: /dev/console: the kernel opens it as init's stdin/stdout/stderr before devtmpfs exists.
CONSOLE_MAJOR = 5
CONSOLE_MINOR = 1


@dataclass(frozen=True)
class Entry:
    """One archive member; ``mode`` includes the file type bits (``stat.S_IF*``)."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad(length: int) -> bytes:
    return b"\0" * (-length % _ALIGN)


def _header(ino: int, entry: Entry) -> bytes:
    name_size = len(entry.name.encode()) + 1
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime: zero for a reproducible archive
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        name_size,
        0,  # check: only used by the "crc" variant
    )
    return NEWC_MAGIC + b"".join(b"%08X" % field for field in fields)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """Serialise ``entries`` (parents before children) and the trailer as one newc archive."""
    out = io.BytesIO()
    all_entries = [*entries, Entry(TRAILER, 0)]
    for ino, entry in enumerate(all_entries, start=1):
        if entry.name.startswith("/") or not entry.name:
            raise ValueError(f"archive member name {entry.name!r} must be relative and non-empty")
        head = _header(0 if entry.name == TRAILER else ino, entry) + entry.name.encode() + b"\0"
        out.write(head + _pad(len(head)))
        out.write(entry.data + _pad(len(entry.data)))
    return out.getvalue()


def guest_entries(busybox: bytes, init_script: bytes) -> list[Entry]:
    """The guest's file tree: busybox, a few applet links, ``/init`` and ``/dev/console``."""
    directory = stat.S_IFDIR | 0o755
    entries = [Entry(name, directory) for name in ("bin", "dev", "proc", "sys", "tmp", "run")]
    entries.append(Entry("bin/busybox", stat.S_IFREG | 0o755, busybox))
    link = stat.S_IFLNK | 0o777
    entries.extend(Entry(f"bin/{applet}", link, b"busybox") for applet in CORE_APPLETS)
    entries.append(Entry("dev/console", stat.S_IFCHR | 0o600,
                         rdev_major=CONSOLE_MAJOR, rdev_minor=CONSOLE_MINOR))
    entries.append(Entry("init", stat.S_IFREG | 0o755, init_script))
    return entries


def build(busybox: Path, init_script: Path, output: Path) -> int:
    """Write the gzip'd archive to ``output`` atomically; returns its size in bytes."""
    if not busybox.is_file():
        raise FileNotFoundError(
            f"busybox binary not found at {busybox}: run scripts/fetch-linux-guest.sh")
    if not init_script.is_file():
        raise FileNotFoundError(f"init script not found at {init_script}")
    archive = write_newc(guest_entries(busybox.read_bytes(), init_script.read_bytes()))
    compressed = gzip.compress(archive, compresslevel=9, mtime=0)
    partial = output.with_name(output.name + ".partial")
    partial.write_bytes(compressed)
    os.replace(partial, output)
    return len(compressed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--busybox", type=Path, required=True, help="static busybox binary")
    parser.add_argument("--init", type=Path, required=True, help="the guest's /init script")
    parser.add_argument("--output", type=Path, required=True, help="initramfs (.cpio.gz) to write")
    args = parser.parse_args(argv)
    try:
        size = build(args.busybox, args.init, args.output)
    except OSError as exc:
        print(f"initramfs: {exc}", file=sys.stderr)
        return 1
    print(f"initramfs: wrote {args.output} ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
