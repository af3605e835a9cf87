"""The monitor's control connections: the controller's, the public socket's, device registrars'.

Every connection is a non-blocking SOCK_SEQPACKET socket watched by the monitor's one epoll, so a
slow or silent client can never hold up fault service. Public peers are checked by SO_PEERCRED
(same uid only) before a request of theirs is read, and at most :data:`MAX_CLIENTS` are held: a
connect storm evicts the connection idle longest rather than locking the VM's user out.
A mixin of :class:`vmmswap.control.monitor.Monitor`, which supplies the epoll and the dispatch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Final

from vmmswap.control.control_socket import (
    Client,
    bind_control_socket,
    idlest_client,
    peer_credentials,
)
from vmmswap.control.monitor_faults import VmmGoneError
from vmmswap.control.protocol import (
    MAX_MESSAGE,
    ErrorKind,
    InitRequest,
    ProtocolError,
    Request,
    Response,
    decode_request,
    encode_response,
    recv_message,
    send_message,
)
from vmmswap.control.status import SwapStatus

_log = logging.getLogger("vmmswap.control.monitor")

MAX_CLIENTS: Final = 32


class ClientConnections:
    """Accepting, admitting, reading and answering control connections."""

    clients: dict[int, Client]
    listener: socket.socket | None
    _listener_id: tuple[int, int] | None
    _exit_client: Client | None
    _exiting: bool

    # Supplied by the monitor.
    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    def _unwatch(self, fd: int) -> None:
        raise NotImplementedError

    def _request_exit(self, client: Client | None) -> None:
        raise NotImplementedError

    def _dispatch(self, client: Client, req: Request | InitRequest, fds: list[int],
                  ) -> Response | None:
        raise NotImplementedError

    def _status(self) -> SwapStatus:
        raise NotImplementedError

    def listen(self, path: str) -> None:
        """Serve the public control socket at ``path`` (see :mod:`.control_socket`)."""
        sock, self._listener_id = bind_control_socket(path)
        self.listener = sock
        self._watch(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(16):  # a bounded batch: faults must not wait behind a connect storm
            assert self.listener is not None
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        pid, uid = peer_credentials(conn)
        refusal = None
        if uid != os.geteuid():
            _log.warning("refusing control connection from pid %d uid %d", pid, uid)
            refusal = f"uid {uid} may not control this VM (only uid {os.geteuid()})"
        if len(self.clients) >= MAX_CLIENTS and (refusal is not None or not self._evict_idlest()):
            # A peer that will be refused never makes room for itself.
            self._send_and_close(conn, Response.failure(ErrorKind.BUSY, "too many clients"))
            return
        self._add_client(Client(conn, public=True, peer_pid=pid, refusal=refusal))

    def _evict_idlest(self) -> bool:
        """Make room by closing the public connection idle longest (refused peers first), so
        connections that never send cannot lock the VM's user out. False if none qualifies."""
        victim = idlest_client(self.clients.values(), keep=self._exit_client)
        if victim is None:
            return False
        _log.info("closing control connection of pid %d, idle for %.0f s: too many clients",
                  victim.peer_pid, time.monotonic() - victim.last_active)
        with contextlib.suppress(OSError, ProtocolError):
            send_message(victim.sock, encode_response(Response.failure(
                ErrorKind.BUSY, "closed: idle while too many clients were connected")))
        self._close_client(victim)
        return True

    @staticmethod
    def _send_and_close(conn: socket.socket, response: Response) -> None:
        """Answer a connection that is not admitted, then close it.

        A request already queued on ``conn`` is read first: closing an AF_UNIX socket with
        unread data resets the peer (ECONNRESET), so the client would lose the answer and see a
        reset instead of "busy". A request that arrives after the drain can still be reset.
        """
        with contextlib.suppress(OSError):
            send_message(conn, encode_response(response))
        with contextlib.suppress(OSError):
            for _ in range(16):
                if not conn.recv(MAX_MESSAGE + 1, socket.MSG_DONTWAIT):
                    break
        conn.close()

    def _add_client(self, client: Client) -> None:
        fd = client.sock.fileno()
        self.clients[fd] = client
        self._watch(fd, lambda: self._on_client(client))

    def _close_client(self, client: Client) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        self._unwatch(fd)
        self.clients.pop(fd, None)
        client.sock.close()
        if not client.public:
            # The VMM closed its controller without asking to exit; bring pages back, stop.
            _log.info("the controller's connection closed; swapping in and exiting")
            if self._exit_client is client:
                self._exit_client = None
            if not self._exiting:
                self._request_exit(None)

    def _reply(self, client: Client, response: Response) -> None:
        try:
            send_message(client.sock, encode_response(response))
        except (OSError, ProtocolError) as err:
            _log.info("dropping client %d: %s", client.peer_pid, err)
            self._close_client(client)

    def _on_client(self, client: Client) -> None:
        client.last_active = time.monotonic()
        try:
            received = recv_message(client.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_client(client)
            return
        if received.eof:
            self._close_client(client)
            return
        if client.refusal is not None:
            received.close_fds()
            self._reply(client, Response.failure(ErrorKind.PERMISSION, client.refusal))
            self._close_client(client)
            return
        try:
            if received.truncated:
                raise ProtocolError("message too long (or too many descriptors)")
            req = decode_request(received.data, len(received.fds), public=client.public)
        except ProtocolError as err:
            received.close_fds()
            self._reply(client, Response.failure(err.kind, str(err)))
            return
        fds, received.fds = received.fds, []
        try:
            response = self._dispatch(client, req, fds)
        except VmmGoneError:
            raise
        except Exception as err:
            _log.exception("%s failed unexpectedly", req)
            response = Response.failure(ErrorKind.FAILED, f"internal error: {err!r}",
                                        self._status())
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if response is not None:
            self._reply(client, response)

    def _attach(self, fds: list[int]) -> Response:
        (fd,) = fds
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            return Response.failure(ErrorKind.REQUEST, f"attach needs a socket: {err}")
        fds.clear()
        if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
            sock.close()
            return Response.failure(ErrorKind.REQUEST, "attach needs an AF_UNIX SEQPACKET "
                                    "socket")
        sock.setblocking(False)
        # A device registrar stays silent until its child registers: never evicted for that.
        self._add_client(Client(sock, public=True, evictable=False))
        return Response(True, "attached")
