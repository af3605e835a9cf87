"""The VMM's side of vmm-swap: start the monitor, send it guest memory, drive it, stop it.

Model: crosvm's ``SwapController``. :meth:`SwapController.launch` runs in the VMM right after
guest memory exists and before anything touches it: it creates the VMM's userfaultfd (full mode:
KVM faults on guest memory from inside the kernel), opens the swap file (O_TMPFILE, 0600) in the
swap directory, starts ``python -m vmmswap.control.monitor`` as a subprocess (never a fork of a
possibly
threaded VMM) and sends it the uffd, the swap file and the region memfds over a SOCK_SEQPACKET
socketpair with SCM_RIGHTS. The monitor then serves every fault and runs every command.

What the VMM keeps: its uffd stays open here for the VMM's whole life. If the monitor dies while
pages are swapped out, faults on them block instead of being zero-filled by the kernel (which is
what closing the last uffd descriptor would do: silent data loss). See :class:`MonitorDiedError`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

from vmmswap.control.protocol import (
    Command,
    ErrorKind,
    InitRequest,
    ProtocolError,
    Request,
    Response,
    decode_response,
    encode_init,
    recv_message,
    request,
    send_message,
    seqpacket_pair,
)
from vmmswap.control.status import SwapState, SwapStatus
from vmmswap.control.swap_device import DeviceRegistrar
from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.uffd.userfaultfd import VMM_SWAP_FEATURES, Userfaultfd

LAUNCH_TIMEOUT: Final = 60.0
#: The folder holding the ``vmmswap`` package (src/ in a checkout): vmmswap/control/controller.py.
_SRC_ROOT: Final = str(Path(__file__).resolve().parents[2])
#: How the monitor is started unless the VMM says otherwise.
MONITOR_COMMAND: Final = (sys.executable, "-m", "vmmswap.control.monitor")

#: uffds of VMMs whose monitor died while memory was registered: kept open on purpose, forever.
_ORPHANED_UFFDS: list[Userfaultfd] = []
_log = logging.getLogger(__name__)


class SwapError(RuntimeError):
    """Base of the controller's errors; ``status`` is the monitor's status when it had one."""

    def __init__(self, message: str, status: SwapStatus | None = None) -> None:
        super().__init__(message)
        self.status = status


class SwapStateError(SwapError):
    """The command is not valid in the current state; nothing changed."""


class SwapFailedError(SwapError):
    """The command was valid but failed (the state says what is left: Failed or unchanged)."""


class SwapRequestError(SwapError):
    """The monitor refused the request itself (a bug on this side or a version mismatch)."""


class MonitorDiedError(SwapError):
    """The monitor process is gone.

    If vmm-swap was enabled, guest pages that were in staging or the swap file died with it:
    every thread that touches one blocks for good (it is never handed a zero page). The VM
    cannot continue; stop it and start it again (from a snapshot if you have one). Threads that
    only touch resident pages keep running.
    """


_ERRORS: Final[dict[ErrorKind, type[SwapError]]] = {
    ErrorKind.STATE: SwapStateError,
    ErrorKind.FAILED: SwapFailedError,
    ErrorKind.REQUEST: SwapRequestError,
    ErrorKind.PERMISSION: SwapRequestError,
    ErrorKind.BUSY: SwapFailedError,
}


def raise_for(response: Response) -> Response:
    """``response`` if it is a success, else the matching :class:`SwapError`."""
    if response.ok:
        return response
    cls = _ERRORS.get(response.error or ErrorKind.FAILED, SwapFailedError)
    raise cls(response.message, response.status)


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


def _registered_ranges(ranges: Iterable[tuple[int, int]]) -> bool:
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


#: Called from a helper thread when the monitor dies while the controller is open.
DeathCallback = Callable[[MonitorDiedError], None]


def _log_death(err: MonitorDiedError) -> None:
    _log.error("%s", err)


class _DeathWatch:
    """A thread that waits on the monitor's pidfd, so a VMM learns of the monitor's death when
    it happens -- its vCPUs may be blocked in faults and never make another request."""

    def __init__(self, pid: int, on_death: Callable[[], None]) -> None:
        self._pidfd = os.pidfd_open(pid)  # close-on-exec, like every pidfd
        self._stop_r, self._stop_w = os.pipe()
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._on_death = on_death
        self._thread = threading.Thread(target=self._run, name=f"vmmswap-monitor-{pid}-watch",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with select.epoll() as ep:
            ep.register(self._pidfd, select.EPOLLIN)
            ep.register(self._stop_r, select.EPOLLIN)
            while True:
                ready = {fd for fd, _ in ep.poll()}
                if self._stop_r in ready:
                    return
                if self._pidfd in ready:
                    self._on_death()
                    return

    def is_current_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def stop(self) -> None:
        """Stop watching (an orderly close is not a death). Idempotent and thread-safe: the
        death callback itself may close the controller while the VMM's thread does too."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            os.write(self._stop_w, b"x")
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=10)
            for fd in (self._stop_w, self._stop_r, self._pidfd):
                os.close(fd)


class SwapController:
    """Handle on a running monitor. Thread-safe: one request at a time over the socketpair."""

    def __init__(self, memory: GuestMemory, uffd: Userfaultfd, sock: socket.socket,
                 process: subprocess.Popen[bytes], control_socket: str | None,
                 on_monitor_died: DeathCallback | None = _log_death) -> None:
        self._memory = memory  # kept so guest memory outlives the monitor's swap-in
        self._uffd = uffd
        self._sock = sock
        self._process = process
        self._lock = threading.Lock()
        self._closed = False
        self._closing = False
        self._close_done = threading.Event()
        self._dead = False
        self._owner = os.getpid()
        self.control_socket = control_socket
        self._on_monitor_died = on_monitor_died
        self._watch: _DeathWatch | None = None
        if on_monitor_died is not None:
            # A weak reference: the watch must not keep a dropped controller alive (its
            # finaliser is what swaps everything back in).
            ref = weakref.ref(self)

            def exited() -> None:
                controller = ref()
                if controller is not None:
                    controller._monitor_exited()

            self._watch = _DeathWatch(process.pid, exited)

    def _monitor_exited(self) -> None:
        """From the watch thread: the monitor is gone, and nobody asked it to go."""
        if self._closing or self._on_monitor_died is None:
            return
        self._dead = True
        try:
            self._on_monitor_died(self._died())
        except Exception:
            _log.exception("the on_monitor_died callback failed")

    # --- launch ---------------------------------------------------------------------------------
    @classmethod
    def launch(cls, memory: GuestMemory, swap_dir: str | os.PathLike[str], *,
               readahead: bool = True, control_socket: str | None = None,
               on_monitor_died: DeathCallback | None = _log_death,
               monitor_command: Sequence[str] | None = None) -> SwapController:
        """Start the monitor for ``memory`` and wait until it is Ready.

        Call it before guest memory is touched by anything but this process, and before any
        device process is forked (those use :meth:`prepare_fork`). ``on_monitor_died`` is
        called (from a helper thread) with the error as soon as the monitor dies unasked;
        the default logs it; None turns the watch off (commands still raise).
        ``monitor_command`` is the program that runs the monitor, default
        ``[sys.executable, "-m", "vmmswap.control.monitor"]``; a VMM may name a wrapper of its
        own (a sandbox, a test entry with a fake page handler). It gets ``--control-fd N
        --vmm-pid P`` appended and must end up in :func:`vmmswap.control.monitor.main`.
        """
        swap_fd = open_swap_file(swap_dir)
        uffd: Userfaultfd | None = None
        ours, theirs = seqpacket_pair()
        process: subprocess.Popen[bytes] | None = None
        try:
            uffd = Userfaultfd.new(VMM_SWAP_FEATURES)
            if control_socket is not None:
                control_socket = os.path.abspath(control_socket)
            process = _start_monitor(theirs, monitor_command)
            theirs.close()
            init = InitRequest(tuple(memory.specs()), os.getpid(), readahead, control_socket)
            send_message(ours, encode_init(init),
                         [uffd.fileno(), swap_fd, *memory.memfds()])
            ours.settimeout(LAUNCH_TIMEOUT)
            received = recv_message(ours)
            received.close_fds()
            ours.settimeout(None)
            if received.eof:
                code = process.wait(timeout=LAUNCH_TIMEOUT)
                raise MonitorDiedError(f"the vmm-swap monitor exited during start-up "
                                       f"(exit code {code}); its stderr says why")
            response = raise_for(decode_response(received.data))
            if response.status is None or response.status.state is not SwapState.READY:
                raise SwapFailedError(f"the monitor did not become Ready: {response.message}",
                                      response.status)
        except BaseException:
            ours.close()
            theirs.close()
            if process is not None:
                _reap(process)
            if uffd is not None:
                uffd.close()  # nothing was ever registered
            raise
        finally:
            os.close(swap_fd)  # the monitor's copy is the only one: the file dies with it
        return cls(memory, uffd, ours, process, control_socket, on_monitor_died)

    # --- properties -----------------------------------------------------------------------------
    @property
    def monitor_pid(self) -> int:
        return self._process.pid

    @property
    def uffd(self) -> Userfaultfd:
        """The VMM's userfaultfd (for diagnostics; the monitor serves it)."""
        return self._uffd

    def monitor_alive(self) -> bool:
        return not self._dead and self._process.poll() is None

    # --- commands -------------------------------------------------------------------------------
    def _request(self, req: Request, fds: Sequence[int] = ()) -> Response:
        if os.getpid() != self._owner:
            # A forked child shares the socket: answers could reach the wrong process.
            raise SwapError("the swap controller belongs to the VMM process; in a forked child "
                            "use the registrar from prepare_fork()")
        with self._lock:
            if self._closed:
                raise SwapError("the swap controller is closed")
            if self._dead:
                raise self._died()
            try:
                return request(self._sock, req, fds)
            except (ConnectionError, BrokenPipeError) as err:
                self._dead = True
                raise self._died() from err

    def _died(self) -> MonitorDiedError:
        code = self._process.poll()
        if code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._process.wait(timeout=5)
        how = "is gone" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        return MonitorDiedError(
            f"the vmm-swap monitor (pid {self._process.pid}) {how}. If swap was enabled, "
            "pages that were swapped out are lost with it: threads touching them block (they "
            "never see zero pages). Stop the VM and start it again.")

    def _command(self, command: Command, **kwargs: bool) -> SwapStatus:
        response = raise_for(self._request(Request(command, **kwargs)))
        assert response.status is not None
        return response.status

    def status(self) -> SwapStatus:
        """The monitor's status (crosvm's ``SwapStatus``, plus readahead figures)."""
        return self._command(Command.STATUS)

    def enable(self) -> SwapStatus:
        """Move guest memory to staging (the monitor freezes this process tree meanwhile).

        Blocks until the move is done; returns the status (Pending). SwapFailedError if the move
        failed (state Failed: :meth:`disable` still brings every page back) or could not start.
        """
        return self._command(Command.ENABLE)

    def trim(self, wait: bool = False, timeout: float | None = None) -> SwapStatus:
        """Drop staging pages that are zero or already in the swap file (state Pending only)."""
        status = self._command(Command.TRIM)
        return self._wait_done(SwapState.TRIM_IN_PROGRESS, SwapState.PENDING, timeout) \
            if wait else status

    def swap_out(self, wait: bool = False, timeout: float | None = None) -> SwapStatus:
        """Write staging memory to the swap file (state Pending only)."""
        status = self._command(Command.OUT)
        return self._wait_done(SwapState.SWAP_OUT_IN_PROGRESS, SwapState.ACTIVE, timeout) \
            if wait else status

    def disable(self, slow_file_cleanup: bool = False, wait: bool = False,
                timeout: float | None = None) -> SwapStatus:
        """Swap every page back in and unregister guest memory; Ready when done."""
        status = self._command(Command.DISABLE, slow_file_cleanup=slow_file_cleanup)
        return self._wait_done(SwapState.SWAP_IN_IN_PROGRESS, SwapState.READY, timeout) \
            if wait else status

    def _wait_done(self, running: SwapState, target: SwapState,
                   timeout: float | None) -> SwapStatus:
        status = wait_while(self.status, running, timeout)
        if status.state is not target:
            raise SwapFailedError(f"expected state {target} after {running}, got "
                                  f"{status.state}: {status.error or 'another command ran'}",
                                  status)
        return status

    def wait_for_state(self, *states: SwapState | str, timeout: float | None = None,
                       poll: float = 0.01) -> SwapStatus:
        """Poll until the state is one of ``states``; TimeoutError (with the last status)."""
        wanted = {SwapState(s) for s in states}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status.state in wanted:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"state {status.state} did not become one of "
                                   f"{sorted(str(s) for s in wanted)} within {timeout} s")
            time.sleep(poll)

    # --- device processes -----------------------------------------------------------------------
    def prepare_fork(self) -> DeviceRegistrar:
        """Call before forking a device process; in the child call ``.register_or_exit()``.

        Creates a private channel to the monitor for the child (crosvm's ``PrepareFork``). Each
        registrar serves one child.
        """
        ours, theirs = seqpacket_pair()
        try:
            raise_for(self._request(Request(Command.ATTACH), [theirs.fileno()]))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return DeviceRegistrar(ours)

    def register_device_process(self, registrar: DeviceRegistrar | None = None,
                                timeout: float = 60.0) -> bool:
        """In a forked child: register this process's own uffd with the monitor.

        Uses ``registrar`` (from :meth:`prepare_fork` in the parent), else a new connection to
        the control socket. Returns the monitor's answer; the child must not touch guest memory
        unless it is True (use ``registrar.register_or_exit()`` for crosvm's exit(1)).
        """
        if registrar is None:
            if self.control_socket is None:
                raise SwapError("no control socket: call prepare_fork() before forking")
            registrar = DeviceRegistrar.connect(self.control_socket)
        return registrar.register(timeout)

    # --- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Swap every page back in, stop the monitor, release the uffd. Idempotent.

        If the monitor died with guest memory still registered, the uffd is deliberately kept
        open (closing it would let the kernel zero-fill swapped-out pages) and
        MonitorDiedError is raised.
        """
        with self._lock:
            if self._closed:
                return
            busy = self._closing
            if not busy:
                self._closing = True
                self._close_done = threading.Event()
            done = self._close_done
        if busy:  # another thread is closing: wait for it (unless it is waiting for us)
            if self._watch is None or not self._watch.is_current_thread():
                done.wait()
            return
        try:
            self._close()
        finally:
            self._close_done.set()

    def _close(self) -> None:
        died: MonitorDiedError | None = None
        try:
            response = self._request(Request(Command.EXIT))
            raise_for(response)
        except MonitorDiedError as err:
            died = err
        except BaseException:
            # e.g. swap-in failed: the monitor keeps serving, nothing is released, and a later
            # death must still be reported.
            self._closing = False
            raise
        if self._watch is not None:
            self._watch.stop()
        with self._lock:
            self._closed = True
            self._sock.close()
            _reap(self._process, wait=60.0)
            ranges = [(s.host_addr, s.host_end) for s in self._memory.specs()]
            if died is not None and _registered_ranges(ranges):
                _ORPHANED_UFFDS.append(self._uffd)
                raise died
            self._uffd.close()

    def __enter__(self) -> SwapController:
        return self

    def __del__(self) -> None:
        # crosvm's Drop: bring every page back and stop the monitor. Never from a forked child,
        # whose copy of this object must not stop the VMM's monitor.
        if getattr(self, "_closed", True) or getattr(self, "_owner", -1) != os.getpid():
            return
        with contextlib.suppress(Exception):
            self.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SwapController monitor={self._process.pid} socket={self.control_socket!r}>"


def wait_while(status_fn: Callable[[], SwapStatus], running: SwapState,
               timeout: float | None = None, poll: float = 0.01) -> SwapStatus:
    """Poll ``status_fn()`` while the state is ``running``; the first other status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = status_fn()
        if status.state is not running:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"still {running} after {timeout} s")
        time.sleep(poll)


def _start_monitor(theirs: socket.socket,
                   command: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
    fd = theirs.fileno()
    if command is None:
        command = MONITOR_COMMAND
    elif not command or not all(isinstance(word, str) and word for word in command):
        raise ValueError(f"monitor_command must be a non-empty list of strings, got {command!r}")
    env = dict(os.environ)
    # The monitor must import this very package, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [*command, "--control-fd", str(fd), "--vmm-pid", str(os.getpid())],
        # stdout is the VMM's (maybe a protocol pipe): the monitor only ever logs to stderr.
        pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
        close_fds=True,
        # Its own session: a Ctrl-C meant for the VMM must not kill the fault server.
        start_new_session=True,
    )


def _reap(process: subprocess.Popen[bytes], wait: float = 5.0) -> None:
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


__all__ = [
    "MonitorDiedError",
    "ProtocolError",
    "SwapController",
    "SwapError",
    "SwapFailedError",
    "SwapRequestError",
    "SwapStateError",
    "open_swap_file",
    "raise_for",
]
