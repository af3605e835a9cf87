"""The host side of a torture scenario: the random commands a VMM's owner issues, and what
each must answer.

Expectations checked on every command:

* trim / out are accepted exactly in Pending (or in a trim that just finished); in any other
  state they are refused with SwapStateError and the state does not change (in-progress work
  may only move on to its own end);
* enable and disable are accepted in every state; only a swap-out onto the full disk, or one
  whose swap-file write was made to tear, may fail (to Failed);
* a monitor killed under a command is invisible but for the pause, except an enable, which is
  reported interrupted (MonitorRestartedError, state Pending or the state before it).
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from vmmswap.control.controller import (
    MonitorRestartedError,
    SwapController,
    SwapFailedError,
    SwapStateError,
)
from vmmswap.control.status import SwapState
from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.dataplane.parked_image import ParkedImageError

from .actors import Failure

TIMEOUT: Final = 30.0
#: The test entry of the monitor with the fault-injecting page handler (tests/control).
INJECTING_MONITOR: Final = (sys.executable,
                            str(Path(__file__).resolve().parents[1] / "control" /
                                "monitor_entry.py"), "control_inject:factory")
S = SwapState
#: Where each in-progress state may go on its own while a refused command was answered.
MAY_BECOME: Final = {S.TRIM_IN_PROGRESS: {S.PENDING}, S.SWAP_OUT_IN_PROGRESS: {S.ACTIVE, S.FAILED},
                     S.SWAP_IN_IN_PROGRESS: {S.READY, S.FAILED}}


#: States in which the monitor must accept a detach (monitor.py's _DETACHABLE).
_DETACHABLE: Final = {S.READY, S.PENDING, S.ACTIVE}


class _ParkCalledOffError(Exception):
    """Raised inside ``detached()`` to call a torture park off after reading."""


@dataclass
class Stats:
    commands: int = 0
    refused: int = 0
    disk_full_failures: int = 0
    eio_scenarios: int = 0
    eio_failures: int = 0
    huge_backed: int = 0
    devices_forked: int = 0
    devices_exited: int = 0
    devices_killed: int = 0
    killed_while_faulting: int = 0
    worker_ops: int = 0
    monitor_kills: int = 0  # SIGKILLs the host sent to the monitor
    crash_armed: int = 0  # scenarios whose monitor also kills itself at a crash point
    restarts: int = 0  # successors that took over (host kills and crash-point kills)
    enables_interrupted: int = 0
    registrations_lost: int = 0
    tracking: int = 0  # scenarios run with dirty tracking
    released_pages: int = 0  # clean pages that left guest memory without a copy
    files_dropped: int = 0  # disables with drop_file while tracking
    pages_checked: int = 0
    parks: int = 0  # parks read (always called off: the VM runs on)
    parks_refused: int = 0  # detach refused (a command running, or Failed)
    states: list[str] = field(default_factory=list)


class HostCommands:
    """The host's commands and the run around them; a scenario sets ``rng``, ``ctl``,
    ``disk_full``, ``eio_at`` and ``options`` and implements ``_run``, ``_teardown`` and
    ``_result``."""

    rng: random.Random
    ctl: SwapController | None
    disk_full: bool
    eio_at: int
    options: Any  # scenario.Options (kept untyped here: scenario imports this module)
    memory: GuestMemory | None

    def __init__(self) -> None:
        self.stats = Stats()
        self.log: list[str] = []
        #: Dirty tracking across the scenario's cycles (drawn at launch).
        self.tracking = False

    def _run(self) -> None:
        raise NotImplementedError

    def check_parked(self, data: bytes) -> None:
        """Raise Failure if a park's memory file ``data`` disagrees with the model where the
        model is sure while the actors run (scenarios that can check set PARK_CHECK)."""
        raise NotImplementedError

    PARK_CHECK = False

    def _teardown(self, error: str | None) -> str | None:
        raise NotImplementedError

    def _result(self, error: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def run(self) -> dict[str, Any]:
        """Run the scenario; its result (``error`` None when it passed) with its time."""
        start = time.monotonic()
        error = None
        try:
            self._run()
        except Failure as err:
            error = str(err)
        except Exception as err:
            error = f"host: {type(err).__name__}: {err}"
        finally:
            error = self._teardown(error)
        return {**self._result(error), "seconds": round(time.monotonic() - start, 3)}

    def launch(self, memory: GuestMemory, readahead: bool,
               inject: dict[str, str] | None = None) -> None:
        """Launch the monitor on the scenario's swap dir (the tiny one when the disk is to
        be full); with INJECT_* settings (``inject``, plus the torn write of ``eio_at``) the
        fault-injecting test monitor."""
        swap_dir = self.options.small_swap_dir if self.disk_full else self.options.swap_dir
        assert swap_dir is not None
        inject = dict(inject or {})
        self.tracking = self.options.skip_written or self.rng.random() < 0.5
        if self.tracking:
            self.stats.tracking = 1
            self.note("dirty tracking on")
        if self.options.skip_written:
            self.note("negative control: the dirty scan loses one written page")
            inject["INJECT_SKIP_WRITTEN"] = "1"
        if self.eio_at:
            self.stats.eio_scenarios = 1
            self.note(f"swap-file write {self.eio_at} will tear with EIO")
            inject["INJECT_EIO_PWRITE_AT"] = str(self.eio_at)
        if not inject:
            self.ctl = SwapController.launch(memory, swap_dir, readahead=readahead,
                                             on_monitor_died=None,
                                             dirty_tracking=self.tracking)
            return
        os.environ.update(inject)
        try:  # the controller copies the environment into the monitor at launch
            self.ctl = SwapController.launch(memory, swap_dir, readahead=readahead,
                                             on_monitor_died=None,
                                             monitor_command=INJECTING_MONITOR,
                                             dirty_tracking=self.tracking)
        finally:
            for key in inject:
                del os.environ[key]

    def host_command(self) -> None:
        """One random command (or a pause) of the host; with dirty tracking also a whole
        cycle's turn (disable to Ready, the guest writes, enable), where kept pages are
        released -- or, written in the pause, must not be."""
        action = self.rng.choices(("enable", "trim", "out", "disable", "status", "pause",
                                   "cycle", "park"),
                                  (5, 3, 4, 3, 1, 2, 3 if self.tracking else 0,
                                   2 if self.PARK_CHECK else 0))[0]
        getattr(self, f"do_{action}")()

    def do_park(self) -> None:
        """A park called off after its memory was read: the monitor detaches, the memory file
        is read where it lies and checked, then a successor must serve on as before."""
        before = self.state()
        ctl = self.controller()
        restarts = ctl.restarts
        self.stats.commands += 1
        data = bytearray()
        try:
            with ctl.detached() as memory:
                data = bytearray(memory.image.size)
                memory.image.read_into(0, memoryview(data))
                if self.options.park_memfds:   # the negative control
                    assert self.memory is not None
                    data = bytearray(b"".join(os.pread(fd, os.fstat(fd).st_size, 0)
                                              for fd in self.memory.memfds()))
                raise _ParkCalledOffError
        except _ParkCalledOffError:
            pass
        except ParkedImageError as err:
            # A kill cut a step short just before the detach: only the successor (now
            # serving) may finish it, so nothing was read.
            self.note(f"park in {before}: {err}")
            self.stats.parks_refused += 1
            return
        except SwapStateError as err:
            now = self.state()
            self.note(f"park in {before} refused, now {now}: {err}")
            if err.status is not None and err.status.state in _DETACHABLE and \
                    "pending" not in str(err):
                raise Failure(f"detach refused in {err.status.state}: {err}") from err
            self.stats.parks_refused += 1
            return
        after = self.state()
        self.note(f"park in {before} read and called off -> {after}")
        if ctl.restarts <= restarts:
            raise Failure(f"a called-off park left restarts at {ctl.restarts}")
        if after is not before and after not in MAY_BECOME.get(before, set()):
            raise Failure(f"a called-off park changed the state {before} -> {after}")
        self.stats.parks += 1
        self.check_parked(bytes(data))

    def do_cycle(self) -> None:
        before = self.state()
        self.stats.commands += 1
        status = self.controller().disable(wait=True, timeout=TIMEOUT)
        if status.state is not S.READY:
            raise Failure(f"disable in {before} (a cycle's turn) ended in {status.state}")
        time.sleep(self.rng.choice((0.0, 0.01, 0.05)))
        self.note(f"cycle's turn from {before}: Ready, kept "
                  f"{status.dirty_tracking.kept_pages} pages")
        self.do_enable()

    def controller(self) -> SwapController:
        assert self.ctl is not None
        return self.ctl

    def note(self, what: str) -> None:
        self.log.append(what)

    def state(self) -> SwapState:
        state = self.controller().status().state
        if not self.stats.states or self.stats.states[-1] != str(state):
            self.stats.states.append(str(state))
        return state

    # --- commands -------------------------------------------------------------------------------
    def do_status(self) -> None:
        self.note(f"status {self.state()}")

    def do_pause(self) -> None:
        pause = self.rng.choice((0.0, 0.005, 0.02, 0.05))
        self.note(f"pause {pause}")
        time.sleep(pause)

    def do_enable(self) -> None:
        before = self.state()
        self.stats.commands += 1
        try:
            status = self.controller().enable()
        except MonitorRestartedError as err:
            assert err.status is not None
            self.note(f"enable in {before} interrupted by a monitor death -> {err.status.state}")
            # Died before it moved anything: the successor carries on with the work the
            # enable was to abort, which may have finished by now.
            finished = {S.SWAP_IN_IN_PROGRESS: S.READY, S.SWAP_OUT_IN_PROGRESS: S.ACTIVE,
                        S.TRIM_IN_PROGRESS: S.PENDING}.get(before, before)
            if err.status.state not in (S.PENDING, before, finished):
                raise Failure(f"an interrupted enable in {before} left {err.status.state}"
                              ) from err
            self.stats.enables_interrupted += 1
            return
        except SwapFailedError as err:
            raise Failure(f"enable in {before} failed: {err}") from err
        self.note(f"enable in {before} -> {status.state}")
        if status.state is not S.PENDING:
            raise Failure(f"enable in {before} gave state {status.state}")

    def do_disable(self) -> None:
        before = self.state()
        slow, wait = self.rng.random() < 0.5, self.rng.random() < 0.5
        drop = self.tracking and self.rng.random() < 0.2
        self.stats.commands += 1
        self.stats.files_dropped += drop
        status = self.controller().disable(slow_file_cleanup=slow, wait=wait, timeout=TIMEOUT,
                                           drop_file=drop)
        self.note(f"disable(slow={slow}, wait={wait}, drop={drop}) in {before} -> "
                  f"{status.state}")
        if wait and status.state is not S.READY:
            raise Failure(f"disable in {before} ended in {status.state}")

    def do_trim(self) -> None:
        self._pending_only("trim", {S.PENDING, S.TRIM_IN_PROGRESS}, {S.PENDING},
                           {S.TRIM_IN_PROGRESS})

    def do_out(self) -> None:
        self._pending_only("out", {S.PENDING, S.TRIM_IN_PROGRESS}, {S.ACTIVE},
                           {S.SWAP_OUT_IN_PROGRESS})

    def _pending_only(self, name: str, may_accept: set[SwapState], done: set[SwapState],
                      running: set[SwapState]) -> None:
        ctl = self.controller()
        wait = self.rng.random() < 0.5
        before = self.state()
        self.stats.commands += 1
        call = ctl.trim if name == "trim" else ctl.swap_out
        restarts_before = ctl.restarts
        try:
            status = call(wait=wait, timeout=TIMEOUT)
        except SwapStateError as err:
            after = self.state()
            self.note(f"{name} in {before} refused, now {after}")
            if before is S.PENDING:
                raise Failure(f"{name} refused in Pending: {err}") from err
            if after is not before and after not in MAY_BECOME.get(before, set()):
                raise Failure(f"a refused {name} changed the state {before} -> {after}") from err
            self.stats.refused += 1
            return
        except SwapFailedError as err:
            after = self.state()
            self.note(f"{name} in {before} failed, now {after}: {err}")
            if name == "out" and self.disk_full and after is S.FAILED:
                self.stats.disk_full_failures += 1
                return
            if self.eio_at and after is S.FAILED and "injected I/O error" in str(err):
                self.stats.eio_failures += 1
                return
            raise Failure(f"{name} in {before} failed: {err}") from err
        self.note(f"{name}(wait={wait}) in {before} -> {status.state}")
        # A monitor killed under the command: the controller answers with the successor's
        # status when the work is running or done, whether or not the dead one got it (an
        # `out` sent while one runs, its answer lost, is "resumed" in SwapOutInProgress).
        restarted = ctl.restarts != restarts_before
        if before not in may_accept and not (restarted and status.state in done | running):
            raise Failure(f"{name} accepted in state {before}")
        if wait and status.state not in done:
            raise Failure(f"{name} in {before} ended in {status.state}")

