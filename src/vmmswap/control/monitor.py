"""The vmm-swap monitor: a separate process that serves every page fault and runs every command.

Started by :meth:`vmmswap.control.controller.SwapController.launch` as
``python -m vmmswap.control.monitor --control-fd N --vmm-pid P``. It is a process of its own
because the VMM's Python threads may touch guest memory while holding the GIL: a fault there
would block the thread that has to serve it.

One thread, one epoll. Tokens: every uffd (the VMM's and each device's), a pidfd per device
process and one for the VMM, the controller's socketpair, the public control socket and its
client connections. Each round serves faults first; a chunk of trim / swap-out / swap-in runs
only when the round saw no fault, so background work rarely delays a blocked guest thread --
unless the last chunk ran more than :data:`MAX_WORK_STARVATION` ago: a guest that faults without
pause (a slow disk, a tight loop over swapped-out memory) must not stop a swap-out or a
disable for as long as it faults. A waiting fault is still served before that chunk.
After a round that served a fault the monitor polls its uffds a little longer before blocking
again (:mod:`.fault_spin`): the next fault of a burst then finds a running CPU instead of paying
an idle CPU's wake-up.

The monitor exits when the controller asks (after swapping every page back in), or at once when
the VMM dies (its pidfd becomes readable): guest memory died with it, and the swap file, opened
O_TMPFILE, disappears with the monitor's descriptor.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import faulthandler
import logging
import mmap
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final

from vmmswap.control.control_socket import (
    Client,
    fd_kind,
    unlink_if_ours,
)
from vmmswap.control.fault_spin import DEFAULT_MAX_WINDOW, DEFAULT_MIN_WINDOW, AdaptiveSpin
from vmmswap.control.freeze import freeze_tree
from vmmswap.control.monitor_clients import ClientConnections
from vmmswap.control.monitor_devices import DeviceRegistration
from vmmswap.control.monitor_faults import UffdEntry, UffdSet, VmmGoneError
from vmmswap.control.monitor_registration import Registration
from vmmswap.control.monitor_resume import (
    HandlerSetup,
    NotResumableError,
    journal_for,
)
from vmmswap.control.monitor_state import CommandError, PageHandlerLike, StateMachine
from vmmswap.control.monitor_tracking import DirtyTracking, tracking_mode
from vmmswap.control.protocol import (
    Command,
    ErrorKind,
    InitFds,
    InitRequest,
    ProtocolError,
    Request,
    Response,
    decode_request,
    encode_response,
    recv_message,
    send_message,
)
from vmmswap.control.restart_area import AREA_SIZE, RestartArea
from vmmswap.control.status import SwapState, SwapStatus
from vmmswap.control.swap_cleanup import FileTruncator
from vmmswap.control.thaw_guard import ThawGuard
from vmmswap.control.thp_restore import HugePageRestorer
from vmmswap.dataplane.guest_memory import (
    memfd_page_size,
    resident_bytes,
    validate_regions,
)
from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.kernel import libc
from vmmswap.uffd.errors import MappingChangingError, ProcessGoneError
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd

_log = logging.getLogger("vmmswap.control.monitor")

INIT_TIMEOUT: Final = 30.0
#: Seconds background work may wait while faults keep coming before one chunk runs anyway.
#: A chunk (2 MiB) costs about a millisecond, so faults lose at most ~10 % of the monitor.
MAX_WORK_STARVATION: Final = 0.01
#: States in which the monitor may detach (Command.DETACH): nothing runs, nothing is half done.
_DETACHABLE: Final = frozenset({SwapState.READY, SwapState.PENDING, SwapState.ACTIVE})
#: What ``ps`` and /proc/<pid>/comm show, like crosvm's "swap monitor".
_PROCESS_NAME: Final = ctypes.create_string_buffer(b"swap monitor")

HandlerFactory = Callable[[HandlerSetup], PageHandlerLike]


def default_handler_factory(setup: HandlerSetup) -> PageHandlerLike:
    """The data plane's PageHandler over the received memfds and swap file.

    The monitor keeps owning the swap file's descriptor (the handler's SwapFile does not
    close it), so the file survives the handler between a disable and the next enable and can
    be truncated gradually after a slow-cleanup disable. With the VMM's staging memfd and
    page state, the handler keeps every page's whereabouts there (a successor resumes it);
    without them a successor cannot take over (NotResumableError).
    """
    swap_file = SwapFile(setup.swap_fd, None, owns_fd=False)
    if setup.state is None or setup.staging_fd is None:
        if setup.resume:
            raise NotResumableError("the page state was not kept: the dead monitor's pages "
                                    "cannot be resumed")
        return PageHandler.create(setup.regions, swap_file=swap_file,
                                  readahead=setup.readahead, tracking=setup.tracking)
    build: Callable[..., PageHandlerLike] | None = getattr(
        PageHandler, "resume" if setup.resume else "create", None)
    if build is None:
        raise NotResumableError("this data plane cannot resume a page state")
    return build(setup.regions, swap_file=swap_file, state=setup.state,
                 staging_fd=setup.staging_fd, readahead=setup.readahead,
                 tracking=setup.tracking)


class Monitor(ClientConnections, DeviceRegistration, DirtyTracking, Registration):
    """Everything the monitor process owns."""

    def __init__(self, controller: socket.socket, init: InitRequest, fds: InitFds,
                 factory: HandlerFactory, spin: AdaptiveSpin | None = None) -> None:
        uffd_fd, self.swap_fd, memfds = fds.uffd, fds.swap, fds.memfds
        #: The VMM's end receives each device's uffd (see _register_process).
        self.keeper = None if fds.keeper is None else socket.socket(fileno=fds.keeper)
        self.staging_fd = fds.staging
        self.state_fd = fds.state
        self.page_state: Any = None
        self.restarts = 0 if init.resume is None else init.resume.restarts
        self.last_resume_seconds = 0.0
        self._control_map: mmap.mmap | None = None
        self.area: RestartArea | None = None
        if fds.control is not None:
            self._control_map = mmap.mmap(fds.control, AREA_SIZE)
            os.close(fds.control)
            self.area = RestartArea(memoryview(self._control_map))
        self.spin = spin if spin is not None else AdaptiveSpin()
        self.init = init
        self.regions = init.regions
        self.memfds = memfds
        #: Each region's page (2 MiB on hugetlbfs), asked of the kernel once.
        self.page_sizes = [memfd_page_size(fd) for fd in memfds]
        self.tracking, self.tracking_reason = tracking_mode(init.dirty_tracking)
        self.keep_limit_bytes = init.keep_file_bytes
        self.factory = factory
        self.epoll = select.epoll()
        self.clients: dict[int, Client] = {}
        self.listener: socket.socket | None = None
        self._listener_id: tuple[int, int] | None = None
        self.truncator = FileTruncator(self.swap_fd)
        #: THP guests get their huge pages back after disable (see control/thp_restore.py).
        self.huge_pages = HugePageRestorer(init.vmm_pid, self.regions)
        self.vmm_pidfd = os.pidfd_open(init.vmm_pid)
        os.set_blocking(uffd_fd, False)  # see _register_process: never block the loop
        main = UffdEntry(Userfaultfd.from_raw_descriptor(uffd_fd, None),
                         init.vmm_pid, main=True)
        self.uffds = UffdSet(self.regions, main, lambda: self.machine.handler, self._dropped,
                             self.page_sizes, track=self.tracking,
                             unheld_remove=self._forget_marks)
        journal = None if self.area is None else journal_for(
            self.area, lambda: self.restarts, lambda: self.last_resume_seconds)
        self.machine = StateMachine(self, page_size=max(self.page_sizes, default=PAGE_SIZE),
                                    journal=journal)
        self._by_fd: dict[int, Callable[[], None]] = {}
        self._done = False
        self._last_step = time.monotonic()
        self._exit_client: Client | None = None
        self._exiting = False
        self._thaw_guard: ThawGuard | None = None  # started at the first freeze
        self._watch(self.vmm_pidfd, self._vmm_exited)
        self._watch(main.fd, lambda: self._serve_watched(main))
        self._add_client(Client(controller, public=False, peer_pid=init.vmm_pid))
        for pid, dev_uffd, dev_pidfd in fds.devices:
            self._adopt_device(pid, dev_uffd, dev_pidfd)

    def _setup(self, resume: bool) -> HandlerSetup:
        self._map_page_state()
        return HandlerSetup(list(zip(self.regions, self.memfds, strict=True)), self.swap_fd,
                            self.init.readahead, self.staging_fd, self.page_state, resume,
                            self.tracking)

    # --- hooks for the state machine ------------------------------------------------------------
    def create_handler(self) -> PageHandlerLike:
        self.truncator.finish()  # crosvm's take_file(): the file must be empty for a new start
        self.huge_pages.note_before()  # before registration and before any page moves
        return self.factory(self._setup(resume=False))

    def freeze(self) -> AbstractContextManager[object]:
        # Registered devices too: a hot-plugged one need not descend from the VMM.
        roots = [self.init.vmm_pid, *(d.pid for d in self.uffds.devices)]
        if self._thaw_guard is None or not self._thaw_guard.alive:
            if self._thaw_guard is not None:
                self._thaw_guard.close()
            self._thaw_guard = ThawGuard.start()
        return freeze_tree(roots, exclude=(os.getpid(),), while_waiting=self._serve_all,
                           witness=self._thaw_guard)

    def main_uffd(self) -> Userfaultfd:
        return self.uffds.main.uffd

    def resident_pages(self) -> int:
        """Resident pages, in the guest's page (as the handler's metrics count them)."""
        return sum(resident_bytes(fd, spec.size, ps) // ps
                   for fd, spec, ps in zip(self.memfds, self.regions, self.page_sizes,
                                           strict=True))

    def disabled(self, slow_file_cleanup: bool) -> None:
        if slow_file_cleanup:
            self.truncator.start()
        else:
            self.truncator.finish()
        self.huge_pages.restore_async()

    # --- epoll plumbing -------------------------------------------------------------------------
    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd] = callback

    def _unwatch(self, fd: int) -> None:
        if self._by_fd.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)

    def _dropped(self, entry: UffdEntry) -> None:
        _log.info("device process %d is gone; its uffd is collected", entry.pid)
        # Its writes since the last scan are unknown now.
        self.forget_clean(f"device process {entry.pid} left")
        self._unwatch(entry.fd)
        if entry.pidfd is not None:
            self._unwatch(entry.pidfd)

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            while not self._done:
                self._round()
        except VmmGoneError as err:
            _log.warning("%s; exiting", err)
        finally:
            self.close()
        return 0

    def _timeout(self) -> float:
        if self.machine.work_pending:
            return 0.0
        waits = [t for t in (self.uffds.next_retry_in(), self.truncator.next_step_in())
                 if t is not None]
        return min(waits) if waits else -1.0

    def _round(self) -> None:
        events = self.epoll.poll(self._timeout())
        faults = 0
        uffd_fds = {e.fd for e in self.uffds.entries}
        # Faults first, then everything else.
        for fd, _ in events:
            if fd in uffd_fds and fd in self._by_fd:
                faults += self._serve_by_fd(fd)
        if faults:
            # More faults are likely to follow at once: catch them on a running CPU.
            faults += self.spin.spin(self._poll_faults)
        self._guarded(self.uffds.retry_stuck)
        for fd, _ in events:
            if fd not in uffd_fds:
                callback = self._by_fd.get(fd)
                if callback is not None:
                    self._guarded(callback)
                if self._done:
                    return
        if self.machine.work_pending and (
                faults == 0 or time.monotonic() - self._last_step >= MAX_WORK_STARVATION):
            self._step()
            self._last_step = time.monotonic()
        self.truncator.tick()
        self._check_exit()

    def _serve_by_fd(self, fd: int) -> int:
        for entry in self.uffds.entries:
            if entry.fd == fd:
                return self._serve(entry)
        return 0

    def _serve(self, entry: UffdEntry) -> int:
        """Serve one descriptor. A bug on this path must not kill the monitor: its staging
        memory is the only copy of the swapped-out pages, so dying would turn a blocked fault
        into a dead VM. The faults stay blocked (never a zero page) and the error is reported."""
        try:
            return self.uffds.serve(entry)
        except VmmGoneError:
            raise
        except Exception as err:
            self.uffds.report(f"serving the uffd of pid {entry.pid} failed unexpectedly: "
                              f"{err!r}", traceback=True, aside="; still serving")
            return 0

    def _poll_faults(self) -> int:
        """Serve every uffd without blocking (the spin's poll); returns the faults seen."""
        return sum(self._serve(entry) for entry in self.uffds.entries)

    def _serve_watched(self, entry: UffdEntry) -> None:
        self._serve(entry)

    def _serve_all(self) -> None:
        for entry in self.uffds.entries:
            if entry.registered:
                self._serve(entry)

    def _step(self) -> None:
        try:
            self.machine.step()
        except MappingChangingError:
            self._serve(self.uffds.main)
        except ProcessGoneError as err:
            raise VmmGoneError(f"the VMM's uffd reports its process gone: {err}") from err
        except Exception as err:
            # A bug, not an I/O error: stop the operation in a defined state, keep serving.
            _log.exception("%s failed unexpectedly", self.machine.state)
            self.machine.fail(f"{self.machine.state} failed unexpectedly: {err!r}")

    @staticmethod
    def _guarded(callback: Callable[[], None]) -> None:
        """Run one event callback; a bug in it must not take the fault server down."""
        try:
            callback()
        except VmmGoneError:
            raise
        except Exception:
            _log.exception("unexpected error handling an event; still serving")

    def _vmm_exited(self) -> None:
        raise VmmGoneError(f"the VMM (pid {self.init.vmm_pid}) has exited")

    # --- exit -----------------------------------------------------------------------------------
    def _request_exit(self, client: Client | None) -> None:
        """Swap everything back in (serving faults meanwhile), then stop."""
        self._exit_client = client
        self._exiting = True
        state = self.machine.state
        if state.enabled and state is not SwapState.SWAP_IN_IN_PROGRESS:
            self.machine.disable(slow_file_cleanup=False)
        self._check_exit()

    def _check_exit(self) -> None:
        if not self._exiting:
            return
        state = self.machine.state
        if state is SwapState.READY:
            # Nobody would serve a kept file's registrations after the exit.
            self.machine.drop_kept()
            self.truncator.finish()
            if self._exit_client is not None:
                self._reply(self._exit_client, Response(True, "monitor exiting; every page "
                                                        "is back in guest memory",
                                                        status=self._status()))
            self._done = True
        elif state is SwapState.FAILED:
            self._exiting = False
            if self._exit_client is not None:
                self._reply(self._exit_client, Response.failure(
                    ErrorKind.FAILED, f"cannot exit: {self.machine.error}; the monitor keeps "
                    "serving faults", self._status()))

    def _status(self) -> SwapStatus:
        status = self.machine.status(len(self.uffds.devices))
        status = dataclasses.replace(status, restarts=self.restarts,
                                     last_resume_seconds=round(self.last_resume_seconds, 6),
                                     dirty_tracking=self.tracking_stats())
        if status.error is None and self.uffds.stuck_count:
            status = dataclasses.replace(status, error=self.uffds.last_error)
        return status

    def _dispatch(self, client: Client, req: Request | InitRequest, fds: list[int],
                  ) -> Response | None:
        """Run one request; descriptors left in ``fds`` are closed by the caller."""
        if isinstance(req, InitRequest):
            return Response.failure(ErrorKind.REQUEST, "the monitor is already initialised")
        if self._exiting and req.command is not Command.STATUS:
            return Response.failure(ErrorKind.BUSY, "the monitor is exiting")
        machine = self.machine
        try:
            if req.command is Command.STATUS:
                pass
            elif req.command is Command.ENABLE:
                machine.enable()
            elif req.command is Command.TRIM:
                machine.trim()
            elif req.command is Command.OUT:
                machine.swap_out()
            elif req.command is Command.DISABLE:
                machine.disable(req.slow_file_cleanup, req.drop_file)
            elif req.command is Command.REGISTER_PROCESS:
                return self._register_process(fds)
            elif req.command is Command.ATTACH:
                return self._attach(fds)
            elif req.command is Command.EXIT:
                self._request_exit(client)
                return None
            elif req.command is Command.DETACH:
                return self._detach()
            else:
                return Response.failure(ErrorKind.REQUEST, f"{req.command} is not a request")
        except CommandError as err:
            return Response.failure(err.kind, str(err), self._status())
        return Response(True, f"{req.command}: ok", status=self._status())

    def _detach(self) -> Response:
        """Answer, then stop at the end of this round and exit 0 with every page left where
        it is. Only between commands in a settled state: nothing half done for the VMM to
        read (the journal is clear between steps), and a successor resumes the same state."""
        state = self.machine.state
        if state not in _DETACHABLE or self.machine.work_pending:
            raise CommandError(ErrorKind.STATE, f"cannot detach in state {state}"
                               f"{' with work pending' if self.machine.work_pending else ''}: "
                               "only in Ready, Pending or Active (wait for the running "
                               "command to finish)")
        self._done = True
        _log.info("detached in state %s: every page stays where it is for the VMM", state)
        return Response(True, "detached: the monitor exits, every page where it was",
                        status=self._status())

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._unwatch(client.sock.fileno())
            client.sock.close()
        self.clients.clear()
        if self.listener is not None:
            self.listener.close()
            if self.init.control_socket and self._listener_id is not None:
                unlink_if_ours(self.init.control_socket, self._listener_id)
        handler, self.machine.handler = self.machine.handler, None
        if handler is not None:
            with contextlib.suppress(Exception):
                handler.close()
        self.uffds.close()
        self.truncator.close()
        self.huge_pages.join()
        if self._thaw_guard is not None:
            self._thaw_guard.close()
        os.close(self.vmm_pidfd)
        for fd in self.memfds:
            os.close(fd)
        if self.keeper is not None:
            self.keeper.close()
        if self.page_state is not None:
            with contextlib.suppress(Exception):
                self.page_state.close()
        for maybe in (self.staging_fd, self.state_fd):
            if maybe is not None:
                with contextlib.suppress(OSError):
                    os.close(maybe)
        self.area = None
        if self._control_map is not None:
            with contextlib.suppress(BufferError):
                self._control_map.close()
        self.epoll.close()


# --- start-up -----------------------------------------------------------------------------------
def _receive_init(sock: socket.socket, vmm_pid: int,
                  spare: bool = False) -> tuple[InitRequest, InitFds]:
    # A spare (started ahead, to take over at the next death) waits as long as it takes; the
    # VMM's exit closes the other end.
    sock.settimeout(None if spare else INIT_TIMEOUT)
    received = recv_message(sock)
    if received.eof:
        raise ConnectionResetError("the controller closed the connection before init")
    try:
        if received.truncated:
            raise ProtocolError("init message too long")
        init = decode_request(received.data, len(received.fds), public=False)
        if not isinstance(init, InitRequest):
            raise ProtocolError("the first message must be init")
        if init.vmm_pid != vmm_pid or os.getppid() != vmm_pid:
            raise ProtocolError(f"init names VMM pid {init.vmm_pid}, but the monitor's parent "
                                f"is {os.getppid()} (--vmm-pid {vmm_pid})")
        validate_regions(init.regions)
        fds = InitFds.split(init, received.fds)
        if fd_kind(fds.uffd) != "anon_inode:[userfaultfd]":
            raise ProtocolError("init: the first descriptor is not a userfaultfd")
        if not stat.S_ISREG(os.fstat(fds.swap).st_mode):
            raise ProtocolError("init: the second descriptor is not a regular file")
        for _pid, dev_uffd, _dev_pidfd in fds.devices:
            if fd_kind(dev_uffd) != "anon_inode:[userfaultfd]":
                raise ProtocolError("init: a device descriptor is not a userfaultfd")
        for spec, fd in zip(init.regions, fds.memfds, strict=True):
            if os.fstat(fd).st_size < spec.size:
                raise ProtocolError(f"init: the memfd of region {spec.guest_addr:#x} is "
                                    f"smaller than {spec.size:#x} bytes")
    except (ProtocolError, ValueError, OSError):
        received.close_fds()
        raise
    sock.settimeout(None)
    sock.setblocking(False)
    return init, fds


def main(argv: Sequence[str] | None = None,
         handler_factory: HandlerFactory = default_handler_factory) -> int:
    """Run the monitor process until the VMM leaves; returns the exit status.

    ``handler_factory`` builds the page handler over the received descriptors. Production
    runs the data plane's; a test entry module (``tests/control/monitor_entry.py``) passes a
    fake or fault-injecting one. Nothing in the environment can choose it: a production process
    never imports code that its environment names.
    """
    parser = argparse.ArgumentParser(prog="python -m vmmswap.control.monitor",
                                     description="vmm-swap monitor (started by SwapController)")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--vmm-pid", type=int, required=True)
    parser.add_argument("--fault-spin-us", type=float, default=DEFAULT_MAX_WINDOW * 1e6,
                        help="longest time to keep polling the uffds after a fault before "
                        "blocking again (adaptive; 0 never spins)")
    parser.add_argument("--log-level", default=os.environ.get("VMMSWAP_LOG_LEVEL", "WARNING"))
    parser.add_argument("--spare", action="store_true",
                        help="started ahead of need: wait for the init without a timeout")
    args = parser.parse_args(argv)
    # posix_spawn (see monitor_process.py) passes every descriptor the VMM did not mark
    # close-on-exec: keep only the standard ones and the control socket.
    if args.control_fd > 2:
        os.closerange(3, args.control_fd)
        os.closerange(args.control_fd + 1, os.sysconf("SC_OPEN_MAX"))
    # SIGUSR1 prints every thread's Python stack to stderr (the VMM's): how a monitor that
    # spins or waits where it should not is diagnosed in the field, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"vmmswap monitor[{os.getpid()}] %(levelname)s %(message)s")
    with contextlib.suppress(OSError):
        libc.prctl(libc.PR_SET_NAME, ctypes.addressof(_PROCESS_NAME))
    # Terminal signals belong to the VMM; the monitor leaves when the VMM says or dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The channel arrives through pass_fds, which makes it inheritable: nothing the monitor
    # may ever start (the thaw guard) should hold the VMM's channel.
    os.set_inheritable(args.control_fd, False)
    sock = socket.socket(fileno=args.control_fd)
    try:
        init, fds = _receive_init(sock, args.vmm_pid, args.spare)
        max_window = max(0.0, args.fault_spin_us) * 1e-6
        spin = AdaptiveSpin(min_window=min(max_window, DEFAULT_MIN_WINDOW),
                            max_window=max_window, window=max_window / 2)
        monitor = Monitor(sock, init, fds, handler_factory, spin)  # a 0 window never spins
    except ConnectionResetError:
        if args.spare:  # a spare no longer needed: the VMM closed its end
            return 0
        _log.error("start-up failed: the controller closed the connection before init")
        return 1
    except (ProtocolError, ValueError, OSError) as err:
        _log.error("start-up failed: %s", err)
        with contextlib.suppress(OSError):
            kind = err.kind if isinstance(err, ProtocolError) else ErrorKind.FAILED
            send_message(sock, encode_response(Response.failure(kind, f"monitor: {err}")))
        return 1
    if init.resume is not None:
        try:
            _log.warning("%s", monitor.resume())
        except Exception as err:
            _log.error("cannot take over from the dead monitor: %s", err, exc_info=not
                       isinstance(err, OSError | NotResumableError))
            with contextlib.suppress(OSError):
                send_message(sock, encode_response(Response.failure(
                    ErrorKind.FAILED, f"monitor: cannot resume: {err}")))
            monitor.close()
            return 1
    try:
        if init.control_socket:
            monitor.listen(init.control_socket)
    except OSError as err:
        _log.error("cannot listen on %s: %s", init.control_socket, err)
        with contextlib.suppress(OSError):
            send_message(sock, encode_response(Response.failure(
                ErrorKind.FAILED, f"monitor: control socket {init.control_socket}: {err}")))
        monitor.close()
        return 1
    send_message(sock, encode_response(Response(True, "ready", status=monitor._status())))
    _log.info("serving VMM %d (%d regions)", init.vmm_pid, len(init.regions))
    return monitor.run()


if __name__ == "__main__":
    sys.exit(main())
