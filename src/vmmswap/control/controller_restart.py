"""The controller's side of a monitor's death: start a successor with every kept descriptor.

A mixin of :class:`~vmmswap.control.controller.SwapController` (its state is the controller's,
declared here). The watch thread (:mod:`.monitor_watch`) calls :meth:`_monitor_exited` when the
monitor is gone; a successor -- the spare started ahead, or a fresh process -- gets the uffd,
the swap file, staging, the page state, the control area and every device's uffd, resumes the
dead monitor's state (:mod:`.monitor_resume`) and serves, within the :class:`RestartPolicy`;
otherwise the controller gives up and the death callback runs. A park's detach
(:mod:`.controller_park`) goes through here too: its outcome decides whether a successor starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

from vmmswap.control.controller_park import ParkDetach
from vmmswap.control.errors import MonitorDiedError
from vmmswap.control.monitor_launch import (
    LAUNCH_TIMEOUT,
    MonitorRestart,
    RestartPolicy,
    Spare,
    SuccessorDiedError,
    handshake,
    reap,
    start_monitor,
)
from vmmswap.control.monitor_process import MonitorProcess
from vmmswap.control.protocol import (
    Command,
    InitRequest,
    ProtocolError,
    Request,
    ResumeInfo,
    request,
    seqpacket_pair,
)

__all__ = ["MonitorSuccession"]

_log = logging.getLogger("vmmswap.control.controller")


class MonitorSuccession(ParkDetach):
    """Successors for a dead monitor (see the module docstring)."""

    policy: RestartPolicy
    _command: Sequence[str] | None
    _readahead: bool
    _dirty_tracking: bool
    _keep_file_bytes: int
    control_socket: str | None
    _spawn_lock: threading.Lock
    _enabling: int
    _spare_wanted: bool
    _deaths: list[float]
    _generation: int
    _on_monitor_died: Callable[[MonitorDiedError], None] | None
    _on_monitor_restarted: Callable[[MonitorRestart], None] | None

    def _died(self, code: int | None, reason: str = "") -> MonitorDiedError:
        raise NotImplementedError

    def _start_spare(self) -> None:
        if not self.policy.spare or self.policy.max_restarts <= 0:
            return
        with self._spawn_lock:
            if self._spare is not None or self._closed or self._closing or self._dead:
                return
            if self._enabling:
                self._spare_wanted = True  # started when the enable is over
                return
            self._spare_wanted = False
            try:
                self._spare = Spare.start(self._command)
            except OSError as err:
                _log.warning("no spare monitor (a restart will take longer): %s", err)

    def _monitor_exited(self, died_at: float) -> int | None:
        """From the watch thread: the monitor is gone. Start a successor (its pid is
        returned, to be watched next) or give up (None)."""
        if self._closed:
            return None
        code: int | None = self._process.wait()
        with self._changed:
            detach = self._detach
        if detach is None:
            if self._closing and code == 0:
                return None  # it exited as asked
            return self._replace_monitor(died_at, code)
        # A park's detach (or a death while detaching): its outcome decides.
        if self._detach_outcome(detach):
            self._detach_finished(detach)
            return None
        try:
            return self._replace_monitor(died_at, code, planned=True)
        finally:
            self._detach_finished(detach)

    def _replace_monitor(self, died_at: float, code: int | None, *,
                         planned: bool = False) -> int | None:
        """Start a successor within the restart policy (``planned``: the first death is a
        called-off park's, which the policy does not count); its pid, or None (gave up)."""
        reason = ""
        first = died_at
        while self.policy.allows([d for d in self._deaths if d not in self._planned],
                                 time.monotonic()) and not self._closed:
            try:
                info = self._restart(died_at, code)
            except SuccessorDiedError as err:
                # The successor was killed too, before it could serve: one more death.
                self._deaths.append(died_at)
                died_at, code = time.monotonic(), err.code
                reason = str(err)
                continue
            except Exception as err:
                reason = f"the successor could not take over: {err}"
                _log.error("%s", reason)
                break
            if planned:
                self._planned.add(first)
            if self._on_monitor_restarted is not None:
                try:
                    self._on_monitor_restarted(info)
                except Exception:
                    _log.exception("the on_monitor_restarted callback failed")
            return info.pid
        else:
            if not self._closed:
                reason = (f"{len(self._deaths)} restart(s) within {self.policy.window:.0f} s: "
                          f"the restart policy allows {self.policy.max_restarts}")
        self._give_up(code, reason)
        return None

    def _give_up(self, code: int | None, reason: str) -> None:
        err = self._died(code, reason)
        with self._changed:
            self._dead = True
            self._death = err
            self._changed.notify_all()
        if self._spare is not None:
            self._spare.close()
            self._spare = None
        if self._on_monitor_died is not None and not self._closing:
            try:
                self._on_monitor_died(err)
            except Exception:
                _log.exception("the on_monitor_died callback failed")

    def _restart(self, died_at: float, code: int | None) -> MonitorRestart:
        """Hand every kept descriptor to a successor and wait until it serves."""
        dead_pid = self._process.pid
        self._kept._drain()  # devices the dead monitor registered just before it died
        spare, self._spare = self._spare, None
        if spare is not None and spare.process.poll() is not None:
            spare.close()
            spare = None
        init = InitRequest(tuple(self._memory.specs()), os.getpid(), self._readahead,
                           self.control_socket, keeper=True, control_area=True,
                           restart_state=self._kept.restart_state,
                           resume=ResumeInfo(len(self._deaths) + 1, died_at),
                           dirty_tracking=self._dirty_tracking,
                           keep_file_bytes=self._keep_file_bytes)
        if spare is not None:
            try:
                process, ours, keeper_ours = self._start_successor(init, spare)
            except (OSError, SuccessorDiedError) as err:
                # The spare died before it was needed (killed with the monitor, say): it never
                # served anything, so it is no death of the VMM's monitor. Start one afresh.
                _log.warning("the spare monitor could not take over (%s); starting one", err)
                process, ours, keeper_ours = self._start_successor(init, None)
        else:
            process, ours, keeper_ours = self._start_successor(init, None)
        seconds = time.monotonic() - died_at
        with self._lock:
            old, self._sock, self._process = self._sock, ours, process
            old.close()
        self._kept.replace_keeper(keeper_ours)
        assert self._watch is not None
        self._watch.set_keeper(keeper_ours.fileno())
        with self._changed:
            self._deaths.append(died_at)
            self._generation += 1
            self._changed.notify_all()
        self._start_spare()
        message = ""
        # Straight to the socket: this thread is the one that would start a next successor,
        # so it must not wait for one as _request does.
        with contextlib.suppress(OSError, ProtocolError), self._lock:
            answer = request(self._sock, Request(Command.STATUS))
            message = (answer.status.error if answer.status is not None else None) or ""
        return MonitorRestart(len(self._deaths), dead_pid, code, process.pid, seconds, message)

    def _start_successor(self, init: InitRequest, spare: Spare | None,
                         ) -> tuple[MonitorProcess, socket.socket, socket.socket]:
        """Start (or wake the spare as) the successor and wait until it serves; its process,
        its socket and the VMM's end of its keeper socket."""
        if spare is None:
            ours, theirs = seqpacket_pair()
            try:
                process = start_monitor(theirs, self._command)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
        else:
            process, ours = spare.process, spare.sock
        keeper_ours, keeper_theirs = seqpacket_pair()
        try:
            fds, pids = self._kept.init_fds(self._uffd.fileno(), keeper_theirs.fileno(),
                                            self._memory.memfds())
            init = dataclasses.replace(init, devices=tuple(pids))
            handshake(ours, process, init, fds, resume=True)
        except BaseException:
            ours.close()
            keeper_ours.close()
            reap(process, wait=1.0)
            raise
        finally:
            keeper_theirs.close()
        return process, ours, keeper_ours

    def _await_successor(self, generation: int, timeout: float = 2 * LAUNCH_TIMEOUT) -> bool:
        """After a request lost its answer: wait until a successor serves (True) or the
        controller gave up (False)."""
        if self._watch is None:
            return False
        with self._changed:
            return self._changed.wait_for(
                lambda: self._generation > generation or self._dead or self._closed,
                timeout) and self._generation > generation

