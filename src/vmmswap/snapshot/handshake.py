"""Firecracker's page-fault-handler handshake: one JSON message and a userfaultfd.

On ``PUT /snapshot/load`` with a ``Uffd`` memory backend, Firecracker creates the userfaultfd,
maps and registers guest memory, connects to the handler's Unix stream socket and sends one
message: a JSON array of ``GuestRegionUffdMapping`` objects with the descriptor attached by
SCM_RIGHTS. Each object has ``base_host_virt_addr``, ``size`` and ``offset`` (bytes into the
memory file, which is guest memory region after region with no header) and the page size in
bytes -- ``page_size`` since Firecracker 1.12, ``page_size_kib`` before (which, despite its
name, also held bytes). A current Firecracker sends both (the old one deprecated, same value),
as compact JSON in the struct's field order; :func:`encode_mappings` writes exactly that, so the
micro-VM's restore sends the same bytes. Either spelling alone is accepted; both must agree.

Validation is strict because a wrong mapping serves the wrong bytes to the guest: every field a
non-negative integer, addresses and sizes page-aligned, regions disjoint. A refused handshake
raises :class:`HandshakeError` before anything is filled.
"""

from __future__ import annotations

import array
import itertools
import json
import os
import socket
from dataclasses import dataclass
from typing import Final

#: Page sizes a handler serves: 4 KiB (anonymous memory) and 2 MiB (hugetlbfs).
PAGE_SIZES: Final = (4096, 2 * 1024 * 1024)
#: A handshake larger than this is refused (Firecracker sends a few hundred bytes per region).
MAX_MESSAGE: Final = 1 << 20
_FIELDS: Final = ("base_host_virt_addr", "size", "offset")


class HandshakeError(ValueError):
    """The VMM's message is not a valid handshake; nothing was served."""


@dataclass(frozen=True, slots=True)
class RegionMapping:
    """One guest memory region as the VMM mapped it (Firecracker's GuestRegionUffdMapping)."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        return self.base_host_virt_addr + self.size

    def as_json(self) -> dict[str, int]:
        """The object as a current Firecracker serialises it (field order included)."""
        return {"base_host_virt_addr": self.base_host_virt_addr, "size": self.size,
                "offset": self.offset, "page_size": self.page_size,
                "page_size_kib": self.page_size}


def _int_field(obj: dict[str, object], name: str, index: int) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HandshakeError(f"region {index}: {name} must be a non-negative integer, "
                             f"got {value!r}")
    return value


def parse_mappings(data: bytes, *, mem_file_size: int | None = None) -> list[RegionMapping]:
    """The regions of a handshake message; :class:`HandshakeError` says what is wrong.

    ``mem_file_size``, when given, must cover every region (``offset + size``): a snapshot
    shorter than the memory it describes is refused rather than served as zeros.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HandshakeError(f"handshake is not JSON: {err}") from None
    if not isinstance(doc, list) or not doc:
        raise HandshakeError("handshake must be a non-empty JSON array of region mappings")
    regions: list[RegionMapping] = []
    for index, obj in enumerate(doc):
        if not isinstance(obj, dict):
            raise HandshakeError(f"region {index} is not a JSON object")
        base, size, offset = (_int_field(obj, name, index) for name in _FIELDS)
        if "page_size" in obj:
            page_size = _int_field(obj, "page_size", index)
            if "page_size_kib" in obj and _int_field(obj, "page_size_kib", index) != page_size:
                raise HandshakeError(f"region {index}: page_size {page_size} and page_size_kib "
                                     f"{obj['page_size_kib']} disagree")
        elif "page_size_kib" in obj:
            page_size = _int_field(obj, "page_size_kib", index)  # bytes, despite the name
        else:
            raise HandshakeError(f"region {index} has neither page_size nor page_size_kib")
        if page_size not in PAGE_SIZES:
            raise HandshakeError(f"region {index}: page size {page_size} is not one of "
                                 f"{PAGE_SIZES}")
        if size == 0 or base % page_size or size % page_size or offset % page_size:
            raise HandshakeError(
                f"region {index}: base {base:#x}, size {size:#x} and offset {offset:#x} must "
                f"be non-zero multiples of the page size {page_size:#x}")
        if mem_file_size is not None and offset + size > mem_file_size:
            raise HandshakeError(f"region {index} ends at file offset {offset + size:#x}, past "
                                 f"the memory file's {mem_file_size:#x} bytes")
        regions.append(RegionMapping(base, size, offset, page_size))
    ordered = sorted(regions, key=lambda r: r.base_host_virt_addr)
    for a, b in itertools.pairwise(ordered):
        if b.base_host_virt_addr < a.end:
            raise HandshakeError(f"regions at {a.base_host_virt_addr:#x} and "
                                 f"{b.base_host_virt_addr:#x} overlap")
    return regions


def encode_mappings(regions: list[RegionMapping]) -> bytes:
    """The handshake message a current Firecracker sends for ``regions`` (serde_json's compact
    form: no spaces)."""
    return json.dumps([r.as_json() for r in regions], separators=(",", ":")).encode()


def send_handshake(sock: socket.socket, regions: list[RegionMapping], uffd_fd: int) -> None:
    """Send the handshake with ``uffd_fd`` attached, as the VMM side does."""
    sock.sendmsg([encode_mappings(regions)],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd_fd]))])


def receive_handshake(conn: socket.socket, *, mem_file_size: int | None = None,
                      timeout: float = 10.0) -> tuple[list[RegionMapping], int]:
    """Read the handshake from a connected stream socket: ``(regions, uffd_fd)``.

    The descriptor arrives close-on-exec (MSG_CMSG_CLOEXEC). The message may arrive in several
    reads on a stream socket; reading continues while the JSON is merely unfinished (for at
    most ``timeout`` seconds). On any error every received descriptor is closed and
    HandshakeError is raised.
    """
    fds: list[int] = []
    data = b""
    conn.settimeout(timeout)
    try:
        while True:
            msg, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4),
                                                       socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if not msg:
                break
            data += msg
            if len(data) > MAX_MESSAGE:
                raise HandshakeError(f"handshake longer than {MAX_MESSAGE} bytes")
            if not _truncated(data):
                break
        if not data:
            raise HandshakeError("the VMM closed the connection without a handshake")
        regions = parse_mappings(data, mem_file_size=mem_file_size)
        if len(fds) != 1:
            raise HandshakeError(f"handshake must carry exactly one userfaultfd, got {len(fds)}")
        what = _fd_kind(fds[0])
        if "userfaultfd" not in what:
            raise HandshakeError(f"the descriptor sent is not a userfaultfd ({what or '?'})")
    except TimeoutError:
        for fd in fds:
            os.close(fd)
        raise HandshakeError(f"no complete handshake within {timeout:g} s") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return regions, fds[0]


def _truncated(data: bytes) -> bool:
    """The bytes so far are the start of a JSON document that has not ended yet (keep
    reading); a complete or plainly malformed one is judged at once."""
    try:
        json.loads(data)
    except UnicodeDecodeError:
        return len(data) < 4  # a multi-byte character may be cut; more cannot fix the rest
    except json.JSONDecodeError as err:
        return err.pos >= len(data.rstrip())
    return False


def _fd_kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
