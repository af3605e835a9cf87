"""Putting the micro-VM under vmm-swap: launching the controller and waiting for its states.

The VMM side of vmm-swap is :class:`vmmswap.control.controller.SwapController`; this module adds
what a
VMM driving it from a script needs: a clear "unavailable" answer when the controller cannot be
imported or launched, and waits for the asynchronous commands (trim, out, disable) to reach
their end state, with a timeout so that nothing hangs silently.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, TypeVar

from vmmswap.dataplane.guest_memory import GuestMemory

T = TypeVar("T")


class SwapUnavailableError(RuntimeError):
    """The swap controller cannot be used; the message says why."""


class SwapTimeoutError(TimeoutError):
    """A swap state was not reached in time; carries the last status seen."""

    def __init__(self, message: str, last: Any) -> None:
        super().__init__(message)
        self.last = last


def launch_controller(memory: GuestMemory, swap_dir: str | os.PathLike[str], *,
                      readahead: bool = True, dirty_tracking: bool = False) -> Any:
    """``SwapController.launch`` for ``memory``; SwapUnavailableError if it cannot run.

    The controller must be launched before any vCPU runs, like crosvm does right after creating
    guest memory.
    """
    try:
        module = importlib.import_module("vmmswap.control.controller")
        controller = module.SwapController
    except (ImportError, AttributeError) as exc:
        raise SwapUnavailableError(f"vmmswap.control.controller is not usable: {exc}") from exc
    return controller.launch(memory, swap_dir, readahead=readahead,
                             dirty_tracking=dirty_tracking)


def state_name(status: Any) -> str:
    """The crosvm-style state string ("Ready", "Pending", ...) of a SwapStatus."""
    state = status.state
    value = getattr(state, "value", state)
    return str(value)


def wait_for_state(status_fn: Callable[[], Any], targets: Collection[str], *,
                   timeout: float = 300.0, poll: float = 0.02,
                   seen: list[str] | None = None) -> Any:
    """Poll ``status_fn()`` until its state is one of ``targets``; return that status.

    ``seen`` collects every distinct state observed on the way (tests assert on it). Reaching
    "Failed" when it is not a target raises SwapTimeoutError at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = status_fn()
        name = state_name(status)
        if seen is not None and (not seen or seen[-1] != name):
            seen.append(name)
        if name in targets:
            return status
        if name == "Failed":
            raise SwapTimeoutError(f"swap failed while waiting for {sorted(targets)}", status)
        if time.monotonic() > deadline:
            raise SwapTimeoutError(
                f"swap state {name} did not reach {sorted(targets)} within {timeout} s", status)
        time.sleep(poll)


def status_transition_pages(status: Any) -> int:
    transition = getattr(status, "state_transition", None)
    return int(getattr(transition, "pages", 0) or 0)


def metrics_dict(status: Any) -> dict[str, int]:
    metrics = getattr(status, "metrics", None)
    if metrics is None:
        return {}
    if is_dataclass(metrics) and not isinstance(metrics, type):
        return {k: int(v) for k, v in asdict(metrics).items()}
    return {k: int(v) for k, v in vars(metrics).items() if isinstance(v, int)}


@dataclass
class Phase:
    """One timed step of a swap scenario."""

    name: str
    seconds: float
    detail: str = ""


class PhaseClock:
    """Times named phases and reports each one as it ends."""

    def __init__(self, report: Callable[[Phase], None] | None = None) -> None:
        self.phases: list[Phase] = []
        self._report = report

    def run(self, name: str, fn: Callable[[], T],
               detail: Callable[[T], str] | None = None) -> T:
        start = time.monotonic()
        result = fn()
        phase = Phase(name, time.monotonic() - start, detail(result) if detail else "")
        self.phases.append(phase)
        if self._report is not None:
            self._report(phase)
        return result
