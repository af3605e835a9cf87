"""Device processes' userfaultfds: checked, handed to the VMM, then served by the monitor.

A device process (forked by the VMM, or hot-plugged) sends its own uffd and a pidfd of itself
(:mod:`.swap_device`). Before the monitor answers, the VMM gets a copy of both on the keeper
socket, so that a successor of this monitor can serve the device too; the pidfd tells the monitor
when the process exits. A mixin of :class:`vmmswap.control.monitor.Monitor`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Final

from vmmswap.control.control_socket import fd_kind, pidfd_pid
from vmmswap.control.monitor_faults import UffdEntry, UffdSet
from vmmswap.control.monitor_state import StateMachine
from vmmswap.control.protocol import ErrorKind, Response, send_message
from vmmswap.control.status import SwapStatus
from vmmswap.uffd.userfaultfd import Userfaultfd

_log = logging.getLogger("vmmswap.control.monitor")

MAX_DEVICES: Final = 256


class DeviceRegistration:
    """REGISTER_PROCESS: adopt a device process's uffd."""

    keeper: socket.socket | None
    uffds: UffdSet
    machine: StateMachine

    # Supplied by the monitor.
    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    def _serve_watched(self, entry: UffdEntry) -> None:
        raise NotImplementedError

    def _status(self) -> SwapStatus:
        raise NotImplementedError

    def _register_process(self, fds: list[int]) -> Response:
        uffd_fd, pidfd = fds
        if fd_kind(uffd_fd) != "anon_inode:[userfaultfd]":
            return Response.failure(ErrorKind.REQUEST, "the first descriptor is not a uffd")
        if fd_kind(pidfd) != "anon_inode:[pidfd]":
            return Response.failure(ErrorKind.REQUEST, "the second descriptor is not a pidfd")
        if len(self.uffds.devices) >= MAX_DEVICES:
            return Response.failure(ErrorKind.BUSY, f"more than {MAX_DEVICES} devices")
        # The monitor is single-threaded: a blocking uffd would hang it in read(2), since epoll
        # reports a blocking uffd as always ready. O_NONBLOCK lives in the shared open file
        # description, which the device process does not read from.
        os.set_blocking(uffd_fd, False)
        pid = pidfd_pid(pidfd)
        if pid <= 0:
            return Response.failure(ErrorKind.FAILED, "the device process has already exited")
        if self.keeper is not None:
            # The VMM holds a copy before the device may touch guest memory: a successor of
            # this monitor gets it from there. A message in flight keeps its descriptors even
            # if this process dies right after sendmsg.
            try:
                send_message(self.keeper, b'{"device":%d}' % pid, [uffd_fd, pidfd])
            except OSError as err:
                return Response.failure(ErrorKind.FAILED, f"cannot hand pid {pid}'s uffd to "
                                        f"the VMM: {err}")
        fds.clear()  # the entry owns them now
        error = self._adopt_device(pid, uffd_fd, pidfd)
        if error is not None:
            return Response.failure(ErrorKind.FAILED, error)
        return Response(True, f"device process {pid} registered",
                        status=self._status())

    def _adopt_device(self, pid: int, uffd_fd: int, pidfd: int) -> str | None:
        """Serve a device's uffd (registered at once when swap is enabled); the error text
        if that failed (the descriptors are closed then)."""
        os.set_blocking(uffd_fd, False)
        try:
            uffd = Userfaultfd.from_raw_descriptor(uffd_fd, None)  # its features: asked
        except (OSError, ValueError) as err:
            os.close(uffd_fd)
            os.close(pidfd)
            return f"pid {pid} sent no usable uffd: {err}"
        entry = UffdEntry(uffd, pid, pidfd)
        try:
            self.uffds.add_device(entry, enabled=self.machine.registered)
        except OSError as err:
            entry.close()
            return f"cannot register pid {pid}'s uffd: {err}"
        self._watch(entry.fd, lambda: self._serve_watched(entry))
        self._watch(pidfd, lambda: self.uffds.drop(entry))
        _log.info("serving device process %d", pid)
        return None
