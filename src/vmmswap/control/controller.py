"""The VMM's side of vmm-swap: start the monitor, send it guest memory, drive it, stop it.

Model: crosvm's ``SwapController``. :meth:`SwapController.launch` runs in the VMM right after
guest memory exists and before anything touches it: it creates the VMM's userfaultfd (full mode:
KVM faults on guest memory from inside the kernel), opens the swap file (O_TMPFILE, 0600) in the
swap directory, starts ``python -m vmmswap.control.monitor`` as a subprocess (never a fork of a
possibly
threaded VMM) and sends it the uffd, the swap file and the region memfds over a SOCK_SEQPACKET
socketpair with SCM_RIGHTS. The monitor then serves every fault and runs every command.

What the VMM keeps: its uffd, the swap file, the staging and page-state memfds, the control
area and a copy of every device's uffd, for its whole life (:mod:`.monitor_launch`). When the
monitor is killed, a successor gets them all and carries on (:mod:`.monitor_resume`); the VMM's
threads see a pause. When no successor can (the restart policy gives up), faults on swapped-out
pages block instead of being zero-filled by the kernel (which is what closing the last uffd
descriptor would do: silent data loss). See :class:`MonitorDiedError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType

from vmmswap.control.controller_restart import MonitorSuccession
from vmmswap.control.errors import (
    MonitorDiedError,
    MonitorRestartedError,
    SwapError,
    SwapFailedError,
    SwapRequestError,
    SwapStateError,
    describe_exit,
    raise_for,
)
from vmmswap.control.monitor_launch import (
    DEFAULT_RESTART,
    NO_RESTART,
    KeptDescriptors,
    MonitorRestart,
    RestartPolicy,
    Spare,
    handshake,
    open_swap_file,
    reap,
    registered_ranges,
    start_monitor,
)
from vmmswap.control.monitor_process import MonitorProcess
from vmmswap.control.monitor_watch import MonitorWatch
from vmmswap.control.protocol import (
    Command,
    InitRequest,
    ProtocolError,
    Request,
    Response,
    request,
    seqpacket_pair,
)
from vmmswap.control.status import SwapState, SwapStatus
from vmmswap.control.swap_device import DeviceRegistrar
from vmmswap.dataplane.dirty import swap_features
from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.uffd.userfaultfd import Userfaultfd

#: uffds of VMMs whose monitor died while memory was registered: kept open on purpose, forever.
_ORPHANED_UFFDS: list[Userfaultfd] = []
_log = logging.getLogger(__name__)


#: Called from a helper thread when the monitor dies while the controller is open and no
#: successor can take over (the restart policy gave up, or the successor could not resume).
DeathCallback = Callable[[MonitorDiedError], None]
#: Called from a helper thread after a successor took over from a killed monitor.
RestartCallback = Callable[[MonitorRestart], None]


def _log_death(err: MonitorDiedError) -> None:
    _log.error("%s", err)


def _log_restart(info: MonitorRestart) -> None:
    _log.warning("the vmm-swap monitor (pid %d) died (%s); monitor %d took over in %.0f ms "
                 "(restart %d)%s", info.dead_pid, describe_exit(info.exit_code), info.pid,
                 info.seconds * 1000, info.count, f": {info.message}" if info.message else "")


class SwapController(MonitorSuccession):
    """Handle on a running monitor. Thread-safe: one request at a time over the socketpair.

    When the monitor is killed, a helper thread starts a successor with the same descriptors
    (see :mod:`.monitor_resume`), within the :class:`RestartPolicy`. A request whose answer
    the death swallowed is sent again to the successor when that is safe (status, disable,
    close; trim and out unless the successor already resumed them); an interrupted enable is
    reported as :class:`MonitorRestartedError` instead (it would stop the VM again).
    """

    def __init__(self, memory: GuestMemory, uffd: Userfaultfd, kept: KeptDescriptors,
                 sock: socket.socket, process: MonitorProcess,
                 control_socket: str | None, *, readahead: bool = True,
                 on_monitor_died: DeathCallback | None = _log_death,
                 on_monitor_restarted: RestartCallback | None = _log_restart,
                 restart_policy: RestartPolicy = DEFAULT_RESTART,
                 monitor_command: Sequence[str] | None = None,
                 dirty_tracking: bool = False, keep_file_bytes: int = -1) -> None:
        self._memory = memory  # kept so guest memory outlives the monitor's swap-in
        self._dirty_tracking = dirty_tracking
        self._keep_file_bytes = keep_file_bytes
        self._uffd = uffd
        self._kept = kept
        self._sock = sock
        self._process = process
        self._readahead = readahead
        self._lock = threading.Lock()
        #: Guards _generation / _dead changes; requests wait on it for a successor.
        self._changed = threading.Condition()
        self._generation = 0
        self._closed = False
        self._closing = False
        self._close_done = threading.Event()
        self._dead = False
        self._death: MonitorDiedError | None = None
        self._owner = os.getpid()
        #: A park in progress (see controller_park.py), and whether one committed.
        self._detach = None
        self._parked = False
        self.control_socket = control_socket
        self._on_monitor_died = on_monitor_died
        self._on_monitor_restarted = on_monitor_restarted
        self.policy = restart_policy
        self._command = monitor_command
        #: time.monotonic() of every death a successor took over from.
        self._deaths: list[float] = []
        #: Those of them that were called-off parks (a planned restart): not deaths for the
        #: restart policy.
        self._planned: set[float] = set()
        self._spare: Spare | None = None
        #: Held while a spare is being started, and to announce an enable: an enable's freeze
        #: must never meet a half-started process (the child of vfork, stopped before its
        #: exec, keeps the starting thread in D and the freeze times out).
        self._spawn_lock = threading.Lock()
        self._enabling = 0
        self._spare_wanted = False
        self._watch: MonitorWatch | None = None
        if on_monitor_died is not None or restart_policy.max_restarts > 0:
            # A weak reference: the watch must not keep a dropped controller alive (its
            # finaliser is what swaps everything back in).
            ref = weakref.ref(self)

            def exited(died_at: float) -> int | None:
                controller = ref()
                return None if controller is None else controller._monitor_exited(died_at)

            def device_event(fd: int | None) -> list[int]:
                controller = ref()
                if controller is None:
                    return []
                if fd is None:
                    return controller._kept.drain_keeper()
                controller._kept.drop_pidfd(fd)
                return []

            keeper = kept.keeper.fileno() if kept.keeper is not None else None
            self._watch = MonitorWatch(process.pid, keeper, exited, device_event)
            self._start_spare()

    # --- launch ---------------------------------------------------------------------------------
    @classmethod
    def launch(cls, memory: GuestMemory, swap_dir: str | os.PathLike[str], *,
               readahead: bool = True, control_socket: str | None = None,
               on_monitor_died: DeathCallback | None = _log_death,
               on_monitor_restarted: RestartCallback | None = _log_restart,
               restart_policy: RestartPolicy | None = None,
               monitor_command: Sequence[str] | None = None,
               dirty_tracking: bool = False,
               keep_file_bytes: int = -1) -> SwapController:
        """Start the monitor for ``memory`` and wait until it is Ready.

        Call it before guest memory is touched by anything but this process, and before any
        device process is forked (those use :meth:`prepare_fork`). A monitor that dies unasked
        is replaced by a successor that takes over every page (``on_monitor_restarted`` is
        called, from a helper thread, with a :class:`MonitorRestart`), up to
        ``restart_policy`` (default :class:`RestartPolicy`: 5 restarts in 60 s, a spare
        monitor started ahead); beyond it, or when no successor can take over,
        ``on_monitor_died`` is called with the error (default: log it) and faults on pages
        that were swapped out block for good. ``NO_RESTART`` restores the old behaviour.
        ``monitor_command`` is the program that runs the monitor, default
        ``[sys.executable, "-m", "vmmswap.control.monitor"]``; a VMM may name a wrapper of its
        own (a sandbox, a test entry with a fake page handler). It gets ``--control-fd N
        --vmm-pid P`` appended and must end up in :func:`vmmswap.control.monitor.main`.
        """
        policy = RestartPolicy() if restart_policy is None else restart_policy
        swap_fd = open_swap_file(swap_dir)
        try:
            kept = KeptDescriptors.create(memory, swap_fd)
        except BaseException:
            os.close(swap_fd)
            raise
        uffd: Userfaultfd | None = None
        ours, theirs = seqpacket_pair()
        keeper_ours, keeper_theirs = seqpacket_pair()
        process: MonitorProcess | None = None
        try:
            uffd = Userfaultfd.new(swap_features())
            if control_socket is not None:
                control_socket = os.path.abspath(control_socket)
            process = start_monitor(theirs, monitor_command)
            theirs.close()
            fds, _ = kept.init_fds(uffd.fileno(), keeper_theirs.fileno(), memory.memfds())
            init = InitRequest(tuple(memory.specs()), os.getpid(), readahead, control_socket,
                               keeper=True, control_area=True,
                               restart_state=kept.restart_state,
                               dirty_tracking=dirty_tracking, keep_file_bytes=keep_file_bytes)
            handshake(ours, process, init, fds, resume=False)
        except BaseException:
            ours.close()
            theirs.close()
            keeper_ours.close()
            if process is not None:
                reap(process)
            if uffd is not None:
                uffd.close()  # nothing was ever registered
            kept.close()
            raise
        finally:
            keeper_theirs.close()
        kept.replace_keeper(keeper_ours)
        return cls(memory, uffd, kept, ours, process, control_socket, readahead=readahead,
                   on_monitor_died=on_monitor_died, on_monitor_restarted=on_monitor_restarted,
                   restart_policy=policy, monitor_command=monitor_command,
                   dirty_tracking=dirty_tracking, keep_file_bytes=keep_file_bytes)

    # --- properties -----------------------------------------------------------------------------
    @property
    def monitor_pid(self) -> int:
        return self._process.pid

    @property
    def uffd(self) -> Userfaultfd:
        """The VMM's userfaultfd (for diagnostics; the monitor serves it)."""
        return self._uffd

    @property
    def restarts(self) -> int:
        """How many successors took over so far."""
        return len(self._deaths)

    @property
    def spare_pid(self) -> int | None:
        """The spare monitor's pid (for tests and diagnostics)."""
        spare = self._spare
        return None if spare is None else spare.process.pid

    def kept_device_pids(self) -> list[int]:
        """Device processes whose uffd this VMM holds a copy of."""
        return sorted(self._kept.devices)

    def monitor_alive(self) -> bool:
        return not self._dead and self._process.poll() is None

    # --- commands -------------------------------------------------------------------------------
    def _request(self, req: Request, fds: Sequence[int] = ()) -> Response:
        if os.getpid() != self._owner:
            # A forked child shares the socket: answers could reach the wrong process.
            raise SwapError("the swap controller belongs to the VMM process; in a forked child "
                            "use the registrar from prepare_fork()")
        while True:
            with self._lock:
                if self._closed:
                    raise SwapError("the swap controller is closed")
                refusal = self._park_refusal()
                if refusal is not None:
                    raise SwapStateError(refusal)
                if self._dead:
                    raise self._death or self._died(self._process.poll())
                generation = self._generation
                try:
                    return request(self._sock, req, fds)
                except (ConnectionError, BrokenPipeError) as err:
                    lost: Exception = err
            # The monitor died with the request: a successor may take over.
            if not self._await_successor(generation):
                if self._watch is None:
                    with self._changed:
                        self._dead = True
                raise (self._death or self._died(self._process.poll())) from lost
            answer = self._after_restart(req)
            if answer is not None:
                return answer

    def _after_restart(self, req: Request) -> Response | None:
        """A request whose answer died with the monitor: the successor's answer, or None to
        send it again."""
        if req.command in (Command.STATUS, Command.DISABLE, Command.EXIT, Command.ATTACH):
            return None  # safe to repeat: disable and exit are valid in every state
        status = self.status()
        resumed = {Command.TRIM: {SwapState.TRIM_IN_PROGRESS},
                   Command.OUT: {SwapState.SWAP_OUT_IN_PROGRESS, SwapState.ACTIVE}}
        if req.command in resumed:
            if status.state in resumed[req.command]:
                return Response(True, f"{req.command}: resumed by the successor monitor",
                                status=status)
            return None
        raise MonitorRestartedError(
            f"the vmm-swap monitor died during {req.command}; its successor took over: "
            f"{status.error or 'state ' + str(status.state)}", status)

    def _died(self, code: int | None, reason: str = "") -> MonitorDiedError:
        if code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._process.wait(timeout=5)
        why = f"; no successor took over ({reason})" if reason else ""
        return MonitorDiedError(
            f"the vmm-swap monitor (pid {self._process.pid}) {describe_exit(code)}{why}. If "
            "swap was enabled, pages that were swapped out are lost with it: threads touching them "
            "block (they never see zero pages). Stop the VM and start it again.")

    def _call(self, command: Command, **kwargs: bool) -> SwapStatus:
        response = raise_for(self._request(Request(command, **kwargs)))
        assert response.status is not None
        return response.status

    def status(self) -> SwapStatus:
        """The monitor's status (crosvm's ``SwapStatus``, plus readahead figures)."""
        return self._call(Command.STATUS)

    def enable(self) -> SwapStatus:
        """Move guest memory to staging (the monitor freezes this process tree meanwhile).

        Blocks until the move is done; returns the status (Pending). SwapFailedError if the move
        failed (state Failed: :meth:`disable` still brings every page back) or could not start;
        MonitorRestartedError if the monitor died during it (the successor's status says
        where it left off).
        """
        with self._spawn_lock:
            self._enabling += 1
        try:
            return self._call(Command.ENABLE)
        finally:
            with self._spawn_lock:
                self._enabling -= 1
                wanted = self._spare_wanted and not self._enabling
            if wanted:
                self._start_spare()

    def trim(self, wait: bool = False, timeout: float | None = None) -> SwapStatus:
        """Drop staging pages that are zero or already in the swap file (state Pending only)."""
        status = self._call(Command.TRIM)
        return self._wait_done(SwapState.TRIM_IN_PROGRESS, SwapState.PENDING, timeout) \
            if wait else status

    def swap_out(self, wait: bool = False, timeout: float | None = None) -> SwapStatus:
        """Write staging memory to the swap file (state Pending only)."""
        status = self._call(Command.OUT)
        return self._wait_done(SwapState.SWAP_OUT_IN_PROGRESS, SwapState.ACTIVE, timeout) \
            if wait else status

    def disable(self, slow_file_cleanup: bool = False, wait: bool = False,
                timeout: float | None = None, drop_file: bool = False) -> SwapStatus:
        """Swap every page back in and unregister guest memory; Ready when done.

        With dirty tracking the swap file's copies and the registration are kept (the next
        enable releases pages nobody wrote without copying them) unless ``drop_file`` or
        ``slow_file_cleanup``; in Ready, either drops a kept file."""
        status = self._call(Command.DISABLE, slow_file_cleanup=slow_file_cleanup,
                            drop_file=drop_file)
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
        if self._parked:
            self._close_parked()
            return
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
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        with self._lock:
            self._sock.close()
            reap(self._process, wait=60.0)
            if self._spare is not None:
                self._spare.close()
                self._spare = None
            self._kept.close()
            ranges = [(s.host_addr, s.host_end) for s in self._memory.specs()]
            if died is not None and registered_ranges(ranges):
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


__all__ = [
    "NO_RESTART",
    "MonitorDiedError",
    "MonitorRestart",
    "MonitorRestartedError",
    "RestartPolicy",
    "ProtocolError",
    "SwapController",
    "SwapError",
    "SwapFailedError",
    "SwapRequestError",
    "SwapStateError",
    "open_swap_file",
    "raise_for",
]
