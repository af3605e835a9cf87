"""Starting a monitor process, and the descriptors the VMM keeps so that it can start another.

Everything that holds guest data or says where it is lives in descriptors the VMM holds for its
whole life (:class:`KeptDescriptors`): its uffd (the controller's), the swap file, the staging
and page-state memfds (when the data plane keeps its page state in a memfd), the control area,
and a copy of every device process's uffd. A monitor is then only a process serving them: when
one is killed, the controller hands the same descriptors to a successor.

Why the VMM keeps the device uffds: a uffd whose last descriptor closes is unregistered and its
ranges fault like plain memory again (zero pages where data was). The device process keeps its
own, but the monitor's copy is the only one that can *serve* it; a successor needs one too. The
monitor sends each device's uffd and pidfd to the VMM on the keeper socket before it answers the
device, so the copy is in the VMM before the device touches guest memory.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from vmmswap.control.errors import (
    MonitorDiedError,
    SwapFailedError,
    describe_exit,
    raise_for,
)
from vmmswap.control.monitor_process import MonitorProcess
from vmmswap.control.protocol import (
    InitRequest,
    decode_response,
    encode_init,
    recv_message,
    send_message,
)
from vmmswap.control.restart_area import AREA_SIZE
from vmmswap.control.status import SwapState
from vmmswap.dataplane.guest_memory import GuestMemory, memfd_page_size

#: The folder holding the ``vmmswap`` package (src/ in a checkout).
_SRC_ROOT: Final = str(Path(__file__).resolve().parents[2])
#: How the monitor is started unless the VMM says otherwise.
MONITOR_COMMAND: Final = (sys.executable, "-m", "vmmswap.control.monitor")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """How often a killed monitor is replaced: at most ``max_restarts`` within ``window``
    seconds; one more death in that window gives up (on_monitor_died, faults block).
    ``spare`` starts the next monitor ahead of need, so a successor skips the interpreter's
    start-up and imports (most of the time a restart would otherwise take)."""

    max_restarts: int = 5
    window: float = 60.0
    spare: bool = True

    def allows(self, deaths: Sequence[float], now: float) -> bool:
        """Whether a restart is allowed after the restarts done at ``deaths``."""
        recent = [t for t in deaths if now - t < self.window]
        return len(recent) < self.max_restarts


NO_RESTART: Final = RestartPolicy(max_restarts=0, spare=False)
DEFAULT_RESTART: Final = RestartPolicy()


@dataclass(frozen=True)
class MonitorRestart:
    """What ``on_monitor_restarted`` is told: the restart's number, the dead monitor's pid
    and exit code, the successor's pid, and the time from the death to the successor serving."""

    count: int
    dead_pid: int
    exit_code: int | None
    pid: int
    seconds: float
    message: str = ""


def open_swap_file(swap_dir: str | os.PathLike[str]) -> int:
    """An unnamed 0600 file in ``swap_dir`` (O_TMPFILE): no name to collide with or to be
    opened by another user, and the kernel frees it when the last descriptor closes."""
    path = os.fspath(swap_dir)
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, f"swap directory {path!r} is not a directory")
    try:
        return os.open(path, os.O_TMPFILE | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        hint = (" (the file system does not support O_TMPFILE; use a directory on ext4, xfs, "
                "btrfs or tmpfs)" if err.errno in (errno.EOPNOTSUPP, errno.EISDIR) else "")
        raise OSError(err.errno, f"cannot create the swap file in {path!r}: "
                      f"{err.strerror}{hint}") from None


def registered_ranges(ranges: Iterable[tuple[int, int]]) -> bool:
    """Whether any VMA overlapping ``ranges`` is registered with a uffd (VmFlags ``um``)."""
    wanted = list(ranges)
    current: tuple[int, int] | None = None
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    start, end = (int(x, 16) for x in head.split("-"))
                    current = (start, end)
                elif head == "VmFlags:" and current is not None:
                    flags = line.split()[1:]
                    if "um" in flags and any(s < current[1] and current[0] < e
                                             for s, e in wanted):
                        return True
    except OSError:
        return True  # cannot tell: assume the worst
    return False


def start_monitor(theirs: socket.socket, command: Sequence[str] | None = None,
                  spare: bool = False) -> MonitorProcess:
    """``command`` (default :data:`MONITOR_COMMAND`) with ``--control-fd N --vmm-pid P``.

    Spawned, not Popen'ed (see :mod:`.monitor_process`: a device forked meanwhile must not be
    able to hold the start up). stdout is the VMM's (maybe a protocol pipe), so the monitor
    gets /dev/null there and logs to stderr; its own session keeps a Ctrl-C meant for the VMM
    from killing the fault server."""
    fd = theirs.fileno()
    if command is None:
        command = MONITOR_COMMAND
    elif not command or not all(isinstance(word, str) and word for word in command):
        raise ValueError(f"monitor_command must be a non-empty list of strings, got {command!r}")
    env = dict(os.environ)
    # The monitor must import this very package, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_ROOT, env.get("PYTHONPATH")) if p)
    target = 3 if fd != 3 else 4
    return MonitorProcess.spawn(
        [*command, "--control-fd", str(target), "--vmm-pid", str(os.getpid()),
         *(("--spare",) if spare else ())], env, pass_fd=fd, target_fd=target)


def reap(process: MonitorProcess, wait: float = 5.0) -> None:
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Spare:
    """A monitor started ahead of need, waiting (imports done) for a successor's init."""

    process: MonitorProcess
    sock: socket.socket

    @classmethod
    def start(cls, command: Sequence[str] | None) -> Spare:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = start_monitor(theirs, command, spare=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(process, ours)

    def close(self) -> None:
        """End it: end of file on its socket makes a waiting spare exit."""
        self.sock.close()
        reap(self.process, wait=5.0)


@dataclass
class KeptDescriptors:
    """What the VMM holds for the monitors it may start. Closed only with the controller."""

    swap_fd: int
    control_fd: int
    staging_fd: int | None = None
    page_state: Any = None
    #: Device processes: pid -> (uffd, pidfd), from the keeper socket.
    devices: dict[int, tuple[int, int]] = field(default_factory=dict)
    keeper: socket.socket | None = None
    #: The guest memory whose discards are announced in the page state.
    memory: GuestMemory | None = None
    #: pidfds received and not yet handed to the watch.
    unwatched: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, memory: GuestMemory, swap_fd: int) -> KeptDescriptors:
        """The control area, and -- when the data plane keeps its page state in a memfd --
        the staging memfd and the page state, for ``memory``."""
        control = os.memfd_create("vmmswap control", os.MFD_CLOEXEC)
        kept = cls(swap_fd, control)
        try:
            os.ftruncate(control, AREA_SIZE)
            if importlib.util.find_spec("vmmswap.dataplane.page_state") is not None:
                page_size = memfd_page_size(memory.memfds()[0])
                staging = importlib.import_module("vmmswap.dataplane.staging")
                kept.staging_fd = staging.create_staging_memfd(page_size)
                state_module = importlib.import_module("vmmswap.dataplane.page_state")
                kept.page_state = state_module.PageState.create(tuple(memory.specs()),
                                                                page_size)
                # A discard is written down in the page state before it is made: a monitor
                # killed after reading its REMOVE leaves the mark for its successor.
                log = importlib.import_module("vmmswap.dataplane.discard_log")
                memory.set_discard_hook(log.DiscardLog(kept.page_state).announce)
                kept.memory = memory
        except BaseException:
            kept.close(keep_swap=True)
            raise
        return kept

    @property
    def restart_state(self) -> bool:
        return self.staging_fd is not None and self.page_state is not None

    def init_fds(self, uffd_fd: int, keeper_fd: int, memfds: Sequence[int],
                 ) -> tuple[list[int], list[int]]:
        """The init's descriptors (order of ``InitRequest``) and the device pids."""
        fds = [uffd_fd, self.swap_fd, keeper_fd, self.control_fd]
        if self.restart_state:
            assert self.staging_fd is not None
            fds += [self.staging_fd, self.page_state.fileno()]
        fds += list(memfds)
        pids = sorted(self.devices)
        for pid in pids:
            fds += list(self.devices[pid])
        return fds, pids

    def drain_keeper(self) -> list[int]:
        """Take every device descriptor waiting on the keeper socket; returns the pidfds not
        yet handed out (these included), for the watch to follow."""
        self._drain()
        added, self.unwatched = self.unwatched, []
        return added

    def _drain(self) -> None:
        added = self.unwatched
        sock = self.keeper
        if sock is None:
            return
        while True:
            try:
                received = recv_message(sock)
            except OSError:  # nothing more (EAGAIN), or the monitor's end is gone
                return
            if received.eof:
                return
            try:
                pid = int(json.loads(received.data)["device"])
                uffd, pidfd = received.fds
            except (ValueError, KeyError, TypeError):
                received.close_fds()
                _log.warning("ignoring a malformed keeper message")
                continue
            old = self.devices.pop(pid, None)
            if old is not None:
                _close_all(old)
            self.devices[pid] = (uffd, pidfd)
            added.append(pidfd)

    def drop_pidfd(self, pidfd: int) -> None:
        """The device process behind ``pidfd`` exited: close its descriptors."""
        for pid, (uffd, fd) in list(self.devices.items()):
            if fd == pidfd:
                del self.devices[pid]
                _close_all((uffd, fd))

    def replace_keeper(self, sock: socket.socket) -> None:
        if self.keeper is not None:
            self.keeper.close()
        sock.setblocking(False)
        self.keeper = sock

    def close(self, keep_swap: bool = False) -> None:
        if self.memory is not None:
            self.memory.set_discard_hook(None)
            self.memory = None
        if self.keeper is not None:
            self.keeper.close()
            self.keeper = None
        for pair in self.devices.values():
            _close_all(pair)
        self.devices.clear()
        if self.page_state is not None:
            with contextlib.suppress(Exception):
                self.page_state.close()
            self.page_state = None
        fds = [self.control_fd, self.staging_fd] + ([] if keep_swap else [self.swap_fd])
        _close_all([fd for fd in fds if fd is not None and fd >= 0])
        self.control_fd = self.swap_fd = -1
        self.staging_fd = None


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


#: Seconds a starting monitor may take to answer its init request.
LAUNCH_TIMEOUT: Final = 60.0


def handshake(sock: socket.socket, process: MonitorProcess, init: InitRequest,
               fds: Sequence[int], *, resume: bool) -> None:
    """Send ``init`` and wait until the monitor says it is Ready (or serving, for a
    successor). SuccessorDiedError if a successor died before answering."""
    send_message(sock, encode_init(init), fds)
    sock.settimeout(LAUNCH_TIMEOUT)
    received = recv_message(sock)
    received.close_fds()
    sock.settimeout(None)
    if received.eof:
        code = process.wait(timeout=LAUNCH_TIMEOUT)
        if resume:
            raise SuccessorDiedError(code)
        raise MonitorDiedError(f"the vmm-swap monitor exited during start-up "
                               f"(exit code {code}); its stderr says why")
    response = raise_for(decode_response(received.data))
    if not resume and (response.status is None or response.status.state is not SwapState.READY):
        raise SwapFailedError(f"the monitor did not become Ready: {response.message}",
                              response.status)


class SuccessorDiedError(Exception):
    """A successor monitor died before it could serve: one more death for the policy."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"the successor monitor {describe_exit(code)} before it could serve")
        self.code = code
