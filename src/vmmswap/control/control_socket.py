"""The monitor's public control socket, and identifying what arrives on it.

The socket is private to the VMM's user twice over: the file is created with mode 0600 (the
umask is narrowed around ``bind``, so there is no window with a wider mode), and every
connection's peer uid (SO_PEERCRED) is checked by the monitor, which also covers a socket whose
mode someone widened later.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
BACKLOG: Final = 16


def bind_control_socket(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening, non-blocking SEQPACKET socket at ``path`` (mode 0600), and the file's
    (device, inode) so that only this very file is removed at exit.

    A stale socket file (nobody listening) is replaced; a live one, or any other file, is an
    error (FileExistsError).
    """
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"control socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        else:
            raise FileExistsError(f"control socket {path} is in use by another monitor")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        old = os.umask(0o177)  # the monitor is single-threaded: nobody else sees this umask
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        st = os.stat(path)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def unlink_if_ours(path: str, ident: tuple[int, int]) -> None:
    """Remove the socket file if it is still the one :func:`bind_control_socket` made."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process that connected, as the kernel recorded them."""
    pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _UCRED.size))
    return pid, uid


def fd_kind(fd: int) -> str:
    """What a received descriptor is, e.g. ``anon_inode:[userfaultfd]`` ("" if unknown)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to; -1 once the process has exited."""
    with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise ValueError("not a pidfd")


# --- connections ----------------------------------------------------------------------------------
#: A connection silent this long may be closed to admit a new one when all slots are taken.
MIN_IDLE_TO_EVICT: Final = 5.0


@dataclass(eq=False)
class Client:
    """A connection: the controller's socketpair (``public`` False) or a control-socket peer."""

    sock: socket.socket
    public: bool
    peer_pid: int = 0
    #: Refused by the peer check: its first request gets a PERMISSION error, then it is closed.
    refusal: str | None = None
    #: When it last sent anything (time.monotonic()): the idlest goes first when slots run out.
    last_active: float = field(default_factory=time.monotonic)
    #: False for a device registrar's connection, silent by design until its child registers.
    evictable: bool = True


def idlest_client(clients: Iterable[Client], keep: Client | None = None) -> Client | None:
    """The public connection to close when every slot is taken: a refused peer if any, else the
    one silent longest, if silent for :data:`MIN_IDLE_TO_EVICT`; never ``keep`` (a client
    waiting for an answer). None when nobody qualifies."""
    now = time.monotonic()
    candidates = [c for c in clients if c.public and c.evictable and c is not keep
                  and (c.refusal is not None or now - c.last_active >= MIN_IDLE_TO_EVICT)]
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.refusal is None, c.last_active))
