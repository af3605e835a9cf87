"""The VMM's own socket: ``vmmswap park SOCKET URL`` reaches the process that runs the VM.

vmm-swap's control socket is the monitor's, and the monitor has no vCPU state: a park needs
the VMM (it holds the vCPUs at their safe point and reads the detached data plane,
:mod:`vmmswap.vm.park_running`). So a VMM that can be parked listens on a socket of its own,
like crosvm's control socket: AF_UNIX SEQPACKET, mode 0600, connections only from its own uid
(SO_PEERCRED), one JSON request per connection and one JSON answer::

    {"version": 1, "command": "park", "url": "s3://bucket/vm1/now"}
    {"ok": true, "parked": {...the park's figures...}}
    {"ok": false, "error": "..."}            (the VM runs on where it was)

The request is handled on the server's thread, one at a time; a committed park ends serving
(:attr:`VmmSocket.parked` is set for the VMM's main thread, which then stops the VM).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

from vmmswap.control.control_socket import bind_control_socket, peer_credentials, unlink_if_ours

__all__ = ["VmmSocket", "VmmSocketError", "park_request"]

VERSION: Final = 1
MAX_MESSAGE: Final = 64 * 1024
#: Seconds a client waits for a park's answer (the upload of a large guest takes a while).
PARK_TIMEOUT: Final = 3600.0

#: Parks the VM at the URL; its figures, or raises (the VM then runs on).
ParkFn = Callable[[str], dict[str, Any]]


class VmmSocketError(OSError):
    """The VMM socket could not be reached or answered nonsense."""


class VmmSocket:
    """Serve park requests for one VM at ``path`` on a thread of its own."""

    def __init__(self, path: str, park: ParkFn) -> None:
        self.path = path
        self._park = park
        self._sock, self._ident = bind_control_socket(path)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        #: Set once a park committed: the VM's memory and state are in the store.
        self.parked = threading.Event()
        self.result: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="vmm-socket", daemon=True)
        self._thread.start()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=PARK_TIMEOUT)
        self._sock.close()
        unlink_if_ours(self.path, self._ident)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while not self.parked.is_set():
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            with contextlib.suppress(BlockingIOError, InterruptedError):
                conn, _ = self._sock.accept()
                with conn:
                    conn.setblocking(True)
                    self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        _pid, uid = peer_credentials(conn)
        if uid != os.geteuid():
            # Its request is read (and dropped) before the answer: closing a socket whose
            # queue still holds data resets the connection, and the peer would see ECONNRESET
            # instead of the refusal.
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.recv(MAX_MESSAGE)
            _answer(conn, {"ok": False, "error": f"uid {uid} may not control this VM"})
            return
        conn.settimeout(10.0)
        try:
            request = json.loads(conn.recv(MAX_MESSAGE))
            if not isinstance(request, dict) or request.get("version") != VERSION:
                raise ValueError(f"a request is a JSON object with version {VERSION}")
            if request.get("command") != "park" or not isinstance(request.get("url"), str):
                raise ValueError("the VMM socket knows one command: "
                                 '{"command": "park", "url": URL}')
        except (OSError, ValueError) as err:
            _answer(conn, {"ok": False, "error": f"bad request: {err}"})
            return
        try:
            result = self._park(request["url"])
        except Exception as err:   # called off: the VM runs on; the client is told why
            _answer(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"})
            return
        self.result = result
        self.parked.set()
        _answer(conn, {"ok": True, "parked": result})


def _answer(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(message).encode())


def park_request(path: str, url: str, timeout: float = PARK_TIMEOUT) -> dict[str, Any]:
    """Ask the VMM at ``path`` to park its VM at ``url``; its answer (``ok``, ``parked`` or
    ``error``). VmmSocketError if it cannot be reached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(json.dumps({"version": VERSION, "command": "park",
                                     "url": url}).encode())
            data = sock.recv(MAX_MESSAGE)
        except OSError as err:
            raise VmmSocketError(f"the VMM socket {path}: {err}") from err
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError as err:
        raise VmmSocketError(f"the VMM socket {path} answered {data[:80]!r}") from err
    if not isinstance(answer, dict):
        raise VmmSocketError(f"the VMM socket {path} answered {answer!r}")
    return answer
