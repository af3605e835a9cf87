"""Registering a device process's own userfaultfd with the monitor.

Why every process needs one: guest memory is a memfd mapped MAP_SHARED. A uffd belongs to one
address space; a process that maps guest memory without a registered uffd of its own reads a
swapped-out page as a *hole*, and the kernel hands it a fresh zero page -- the guest's data is
silently gone. So a device process forked by the VMM (which does not inherit the VMM's uffd
registration across fork) must, before it touches guest memory, create its own uffd and hand it
to the monitor, then wait for the answer. This is crosvm's ``SwapDeviceUffdSender`` flow, done
with a pidfd so the monitor notices the process's exit without crosvm's dummy-page probing.

Two ways to reach the monitor:

* ``registrar = controller.prepare_fork()`` in the VMM before ``fork()``; the child calls
  ``registrar.register_or_exit()`` (works without a public control socket);
* ``DeviceRegistrar.connect(control_socket_path)`` from any process of the same user
  (hot-plugged devices started later).

The child keeps its uffd open for the rest of its life (module-level list): if it closed it, the
kernel would unregister the ranges and zero-fill swapped-out pages on the next touch.
"""

from __future__ import annotations

import os
import socket
from types import TracebackType

from vmmswap.control.protocol import Command, ProtocolError, Request, request
from vmmswap.dataplane.dirty import swap_features
from vmmswap.uffd.userfaultfd import Userfaultfd

#: This process's uffd(s) once registered: never closed while the process lives.
_REGISTERED_UFFDS: list[Userfaultfd] = []


class DeviceRegistrar:
    """One channel to the monitor for one device process."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def connect(cls, control_socket: str) -> DeviceRegistrar:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(control_socket)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def register(self, timeout: float = 60.0) -> bool:
        """Create this process's uffd, send it (and a pidfd of this process) to the monitor and
        wait for the answer. True: the monitor serves this process; it may touch guest memory.

        **Safety**: call it in the process that will touch guest memory (the uffd is bound to
        the calling process's address space), before it touches any.
        """
        uffd = Userfaultfd.new(swap_features())
        pidfd = os.pidfd_open(os.getpid())
        try:
            self._sock.settimeout(timeout)
            response = request(self._sock, Request(Command.REGISTER_PROCESS),
                               [uffd.fileno(), pidfd])
        except (OSError, ProtocolError):
            uffd.close()
            return False
        finally:
            os.close(pidfd)
            self.close()
        if not response.ok:
            uffd.close()  # the monitor refused: nothing was registered on it
            return False
        _REGISTERED_UFFDS.append(uffd)
        return True

    def register_or_exit(self, timeout: float = 60.0) -> None:
        """:meth:`register`, and ``os._exit(1)`` when the monitor says no (crosvm's policy:
        a device that cannot be served must not run)."""
        if not self.register(timeout):
            os._exit(1)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> DeviceRegistrar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
