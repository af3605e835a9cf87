"""Every transition of the state machine, driven with a fake handler (no processes, no uffd)."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from vmmswap.control.monitor_state import CommandError, StateMachine
from vmmswap.control.protocol import ErrorKind
from vmmswap.control.status import SwapState


@dataclass
class Metrics:
    staging_pages: int = 0
    swap_pages: int = 0
    resident_pages: int = 0


class Trim:
    def __init__(self, pages: int) -> None:
        self.left = pages

    def trim_pages(self, max_pages: int = 1024) -> int | None:
        if self.left == 0:
            return None
        n = min(self.left, 3)
        self.left -= n
        return n


class SwapIn:
    def __init__(self, handler: Handler) -> None:
        self.h = handler
        self.closed = False

    def swap_in(self, uffd: Any, max_bytes: int = 0) -> int:
        if self.h.fail_swap_in:
            raise OSError(errno.EIO, "read error")
        n = min(self.h.staging + self.h.swapped, 4)
        take = min(n, self.h.staging)
        self.h.staging -= take
        self.h.swapped -= n - take
        return n

    def close(self) -> None:
        self.closed = True


@dataclass
class Handler:
    resident: int = 10
    staging: int = 0
    swapped: int = 0
    fail_move: bool = False
    fail_out: OSError | None = None
    fail_swap_in: bool = False
    closed: bool = False
    swap_ins: list[SwapIn] = field(default_factory=list)

    def move_to_staging(self) -> int:
        if self.fail_move:
            raise OSError(errno.EIO, "copy failed")
        moved, self.resident = self.resident, 0
        self.staging += moved
        return moved

    def handle_page_fault(self, uffd: Any, addr: int, write: bool = False) -> None:
        pass

    def handle_remove(self, start: int, end: int) -> None:
        pass

    def start_trim(self) -> Trim:
        return Trim(5)

    def swap_out(self, max_bytes: int = 0) -> int:
        if self.fail_out is not None:
            raise self.fail_out
        n = min(self.staging, 4)
        self.staging -= n
        self.swapped += n
        return n

    def start_swap_in(self) -> SwapIn:
        ctx = SwapIn(self)
        self.swap_ins.append(ctx)
        return ctx

    def metrics(self) -> Metrics:
        return Metrics(self.staging, self.swapped, self.resident)

    def close(self) -> None:
        self.closed = True


class Hooks:
    def __init__(self) -> None:
        self.handler = Handler()
        self.log: list[str] = []
        self.freeze_error: OSError | None = None
        self.register_error: OSError | None = None
        self.frozen = False

    def create_handler(self) -> Handler:
        self.log.append("create")
        self.handler = Handler()
        return self.handler

    @contextlib.contextmanager
    def _freeze(self) -> Iterator[None]:
        if self.freeze_error is not None:
            raise self.freeze_error
        self.frozen = True
        self.log.append("freeze")
        try:
            yield
        finally:
            self.frozen = False
            self.log.append("thaw")

    def freeze(self) -> contextlib.AbstractContextManager[None]:
        return self._freeze()

    def register_all(self) -> None:
        assert self.frozen, "registration happens while frozen"
        if self.register_error is not None:
            raise self.register_error
        self.log.append("register")

    def unregister_all(self) -> None:
        self.log.append("unregister")

    def main_uffd(self) -> object:
        return object()

    def resident_pages(self) -> int:
        return 10

    def disabled(self, slow_file_cleanup: bool) -> None:
        self.log.append(f"disabled slow={slow_file_cleanup}")


def run(machine: StateMachine) -> None:
    for _ in range(100):
        if not machine.work_pending:
            return
        machine.step()
    raise AssertionError("work never finished")


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def machine(hooks: Hooks) -> StateMachine:
    return StateMachine(hooks)


def test_enable_out_disable(machine: StateMachine, hooks: Hooks) -> None:
    status = machine.enable()
    assert status.state is SwapState.PENDING and status.state_transition.pages == 10
    assert hooks.log == ["create", "freeze", "register", "thaw"]
    machine.swap_out()
    assert machine.state is SwapState.SWAP_OUT_IN_PROGRESS
    run(machine)
    assert machine.state is SwapState.ACTIVE
    assert machine.status().state_transition.pages == 10
    machine.disable()
    assert machine.state is SwapState.SWAP_IN_IN_PROGRESS
    run(machine)
    assert machine.state is SwapState.READY and machine.handler is None
    assert hooks.handler.closed and hooks.log[-2:] == ["unregister", "disabled slow=False"]
    assert machine.status().state_transition.pages == 10


def test_trim_goes_back_to_pending_with_its_count(machine: StateMachine) -> None:
    machine.enable()
    machine.trim()
    assert machine.state is SwapState.TRIM_IN_PROGRESS
    run(machine)
    assert machine.state is SwapState.PENDING
    assert machine.status().state_transition.pages == 5


@pytest.mark.parametrize("command", ["trim", "swap_out"])
def test_commands_in_ready_are_refused(machine: StateMachine, command: str) -> None:
    with pytest.raises(CommandError, match="run enable first") as info:
        getattr(machine, command)()
    assert info.value.kind is ErrorKind.STATE
    assert machine.state is SwapState.READY


@pytest.mark.parametrize("setup", ["trim", "out", "active", "swap_in"])
@pytest.mark.parametrize("command", ["trim", "swap_out"])
def test_trim_and_out_need_pending(machine: StateMachine, setup: str, command: str) -> None:
    machine.enable()
    if setup == "trim":
        machine.trim()
    elif setup in ("out", "active"):
        machine.swap_out()
        if setup == "active":
            run(machine)
    else:
        machine.disable()
    before = machine.state
    with pytest.raises(CommandError, match="needs state Pending") as info:
        getattr(machine, command)()
    assert info.value.kind is ErrorKind.STATE and machine.state is before


@pytest.mark.parametrize("setup", ["pending", "trim", "out", "active", "swap_in", "failed"])
def test_enable_again_from_every_enabled_state(machine: StateMachine, hooks: Hooks,
                                               setup: str) -> None:
    machine.enable()
    if setup == "trim":
        machine.trim()
        machine.step()
    elif setup in ("out", "active"):
        machine.swap_out()
        machine.step()
        if setup == "active":
            run(machine)
    elif setup == "swap_in":
        machine.disable()
        machine.step()
    elif setup == "failed":
        hooks.handler.fail_out = OSError(errno.ENOSPC, "full")
        machine.swap_out()
        machine.step()
        assert machine.state is SwapState.FAILED
        hooks.handler.fail_out = None
    hooks.handler.resident = 3  # the guest touched pages since
    status = machine.enable()
    assert status.state is SwapState.PENDING and status.state_transition.pages == 3
    assert hooks.log.count("create") == 1 and hooks.log.count("register") == 1
    if setup == "swap_in":
        assert hooks.handler.swap_ins[0].closed
    assert machine.error is None


def test_failed_move_is_failed_and_disable_recovers(machine: StateMachine,
                                                    hooks: Hooks) -> None:
    machine.enable()
    hooks.handler.fail_move = True
    with pytest.raises(CommandError, match="copy failed") as info:
        machine.enable()
    assert info.value.kind is ErrorKind.FAILED
    status = machine.status()
    assert status.state is SwapState.FAILED and "copy failed" in (status.error or "")
    assert status.state_transition.pages == 0
    assert hooks.log[-1] == "thaw"
    machine.disable()
    run(machine)
    assert machine.state is SwapState.READY and hooks.handler.staging == 0


def test_full_disk_during_out_is_failed_without_loss(machine: StateMachine,
                                                     hooks: Hooks) -> None:
    machine.enable()
    machine.swap_out()
    machine.step()
    hooks.handler.fail_out = OSError(errno.ENOSPC, "No space left on device")
    machine.step()
    assert machine.state is SwapState.FAILED and "No space" in (machine.error or "")
    assert hooks.handler.staging + hooks.handler.swapped == 10
    for command in ("trim", "swap_out"):
        with pytest.raises(CommandError):
            getattr(machine, command)()
    machine.disable()
    run(machine)
    assert machine.state is SwapState.READY


def test_failed_freeze_changes_nothing(machine: StateMachine, hooks: Hooks) -> None:
    hooks.freeze_error = OSError(errno.ETIME, "threads did not stop")
    with pytest.raises(CommandError, match="did not stop") as info:
        machine.enable()
    assert info.value.kind is ErrorKind.FAILED
    assert machine.state is SwapState.READY and machine.handler is None and hooks.handler.closed
    hooks.freeze_error = None
    machine.enable()
    machine.swap_out()
    hooks.freeze_error = OSError(errno.ETIME, "threads did not stop")
    with pytest.raises(CommandError):
        machine.enable()
    assert machine.state is SwapState.SWAP_OUT_IN_PROGRESS


def test_failed_registration_leaves_ready(machine: StateMachine, hooks: Hooks) -> None:
    hooks.register_error = OSError(errno.EINVAL, "bad range")
    with pytest.raises(CommandError, match="bad range"):
        machine.enable()
    assert machine.state is SwapState.READY and hooks.log[-1] == "thaw"


def test_failed_handler_creation_leaves_ready(machine: StateMachine, hooks: Hooks) -> None:
    def broken() -> Handler:
        raise OSError(errno.ENOSPC, "no memory for staging")
    hooks.create_handler = broken  # type: ignore[method-assign]
    with pytest.raises(CommandError, match="page handler"):
        machine.enable()
    assert machine.state is SwapState.READY


def test_disable_while_swapping_in_updates_cleanup_flag(machine: StateMachine,
                                                        hooks: Hooks) -> None:
    machine.enable()
    machine.disable(slow_file_cleanup=False)
    machine.disable(slow_file_cleanup=True)
    assert len(hooks.handler.swap_ins) == 1
    run(machine)
    assert hooks.log[-1] == "disabled slow=True"


def test_disable_aborts_trim_and_out(machine: StateMachine) -> None:
    machine.enable()
    machine.trim()
    machine.disable()
    assert machine.state is SwapState.SWAP_IN_IN_PROGRESS
    run(machine)
    machine.enable()
    machine.swap_out()
    machine.step()
    machine.disable()
    run(machine)
    assert machine.state is SwapState.READY


def test_disable_in_ready_is_accepted(machine: StateMachine, hooks: Hooks) -> None:
    machine.disable()
    assert machine.state is SwapState.READY and hooks.log == ["disabled slow=False"]


def test_failed_swap_in_is_failed_and_retryable(machine: StateMachine, hooks: Hooks) -> None:
    machine.enable()
    hooks.handler.fail_swap_in = True
    machine.disable()
    machine.step()
    assert machine.state is SwapState.FAILED and "swap in failed" in (machine.error or "")
    assert machine.handler is not None and hooks.handler.staging == 10
    hooks.handler.fail_swap_in = False
    machine.disable()
    run(machine)
    assert machine.state is SwapState.READY


def test_time_is_reported_while_in_progress() -> None:
    now = [100.0]
    hooks = Hooks()
    machine = StateMachine(hooks, clock=lambda: now[0])
    machine.enable()
    machine.swap_out()
    now[0] += 1.5
    assert machine.status().state_transition.time_ms == 1500


class PreparingHandler(Handler):
    """A handler with the optional pre-freeze hooks; records when they run."""

    def __init__(self, hooks: Hooks, fail_prepare: bool = False) -> None:
        super().__init__()
        self.hooks = hooks
        self.fail_prepare = fail_prepare

    def prepare_move(self, between: Any = None) -> None:
        self.hooks.log.append("prepare (frozen)" if self.hooks.frozen else "prepare")
        if between is not None:
            between()
        if self.fail_prepare:
            raise OSError(errno.ENOMEM, "no memory to prepare")

    def release_prepared(self) -> None:
        self.hooks.log.append("release")


@pytest.mark.parametrize("fail_prepare", [False, True])
def test_enable_prepares_before_the_freeze(machine: StateMachine, hooks: Hooks,
                                           fail_prepare: bool) -> None:
    """The handler prepares while the VMM runs; a failing preparation is only a lost
    speed-up (the move still runs); a failed freeze releases what was prepared."""
    handler = PreparingHandler(hooks, fail_prepare)
    hooks.create_handler = lambda: handler  # type: ignore[method-assign]
    status = machine.enable()
    assert status.state is SwapState.PENDING and status.state_transition.pages == 10
    assert hooks.log == ["prepare", "freeze", "register", "thaw"]
    hooks.log.clear()
    hooks.freeze_error = OSError(errno.ESRCH, "cannot stop the VMM")
    with pytest.raises(CommandError):
        machine.enable()
    assert hooks.log == ["prepare", "release"]
    assert machine.state is SwapState.PENDING


def test_prepare_serves_faults_between_steps(machine: StateMachine, hooks: Hooks) -> None:
    """A monitor offering ``serve_pending`` has it called during the preparation."""
    handler = PreparingHandler(hooks)
    hooks.create_handler = lambda: handler  # type: ignore[method-assign]
    hooks.serve_pending = lambda: hooks.log.append("serve")  # type: ignore[attr-defined]
    machine.enable()
    assert hooks.log == ["prepare", "serve", "freeze", "register", "thaw"]
