"""Drive memtest86+ through its menu over the serial console, and run it under vmm-swap.

memtest is configured the way a person at the console would: <F1> ("1" over serial), typed
in its 3-second start pause or while it tests, opens the settings, where the test list and the
address range are set (keys are queued in the UART, one is read per menu step, so each is sent
after the menu that reads it has been drawn). The selection runs on a small range because on
PVM every guest instruction is emulated (about 0.5 us each): test #5 ("moving inversions,
random pattern") over 128 KiB takes 15-40 s per pass, depending on the host's load. Test #5
writes a fresh random pattern every pass, so a page served from an out-of-date copy is caught,
which the fixed-pattern address tests cannot do.

:func:`run_swap_passes` is the e2e check: a clean pass, then enable -> trim -> swap out while
memtest runs (its pages come back through vmm-swap's faults) and a full pass while Active, then
disable and one more pass; every pass must end with memtest's error count at 0. ``cycles=2``
swaps out a second time after a pass while Active, the sequence ``vmmswap demo --guest
memtest86+`` runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmmswap.control.controller import SwapController
from vmmswap.control.status import SwapStatus
from vmmswap.vm.memtest.guest import MemtestGuest
from vmmswap.vm.memtest.screen import MemtestStatus, read_status

Report = Callable[[str], None]

#: Test #5: moving inversions with a random pattern that changes every pass.
DEFAULT_TESTS = (5,)
#: 4 MiB .. 4.125 MiB (128 KiB), in 4 KiB pages as memtest's range prompt takes them ("1024p").
DEFAULT_RANGE_PAGES = (1024, 1056)
_KEY_GAP = 0.2
_POLL = 0.1


@dataclass(frozen=True)
class Selection:
    tests: tuple[int, ...] = DEFAULT_TESTS
    lower_page: int = DEFAULT_RANGE_PAGES[0]
    upper_page: int = DEFAULT_RANGE_PAGES[1]

    @property
    def range_bytes(self) -> tuple[int, int]:
        return self.lower_page * 4096, self.upper_page * 4096


def wait_for_text(guest: MemtestGuest, text: str, timeout: float) -> None:
    """Wait until ``text`` is on memtest's screen; TimeoutError shows the screen."""
    deadline = time.monotonic() + timeout
    while text not in guest.screen().text():
        guest.raise_if_failed()
        if time.monotonic() > deadline:
            raise TimeoutError(f"memtest did not show {text!r} within {timeout} s; screen:\n"
                               f"{guest.screen().text()}")
        time.sleep(_POLL)


def _keys(guest: MemtestGuest, keys: str, then: str, timeout: float) -> None:
    for key in keys:
        guest.press(key)
        time.sleep(_KEY_GAP)
    wait_for_text(guest, then, timeout)


def configure(guest: MemtestGuest, selection: Selection, timeout: float = 60.0) -> None:
    """Open the settings in the start pause, choose the tests and range, and start testing."""
    # The key is typed as soon as memtest's UART is set up (its first output): the serial
    # screen lags the real one by seconds, so waiting for the pause prompt can miss the 3 s
    # pause on a loaded host. Queued, <F1> is read in the pause or, later, while testing;
    # both open the same settings.
    deadline = time.monotonic() + timeout
    while not guest.output():
        guest.raise_if_failed()
        if time.monotonic() > deadline:
            raise TimeoutError(f"memtest wrote nothing to its console within {timeout} s")
        time.sleep(0.01)
    _keys(guest, "1", "Settings:", timeout)
    _keys(guest, "1", "Test Selection:", timeout)
    _keys(guest, "1", "Current selection:", timeout)  # clear the list
    for test in selection.tests:
        _keys(guest, f"3{test}\n", "Current selection:", timeout)
    _keys(guest, "0", "Settings:", timeout)
    _keys(guest, "2", "Address Range:", timeout)
    _keys(guest, f"1{selection.lower_page}p\n", "Current range:", timeout)
    _keys(guest, f"2{selection.upper_page}p\n", "Current range:", timeout)
    _keys(guest, "0", "Settings:", timeout)
    # Leaving the settings starts the run; the chosen test on the screen proves it applied.
    _keys(guest, "0", f"Test #{selection.tests[0]} ", timeout)


def current_status(guest: MemtestGuest) -> MemtestStatus:
    status = read_status(guest.screen())
    if status is None:
        raise RuntimeError(f"memtest shows no status line; screen:\n{guest.screen().text()}")
    return status


def wait_for_pass(guest: MemtestGuest, passes: int, timeout: float) -> MemtestStatus:
    """Wait until memtest has completed ``passes`` passes (or reported an error)."""
    deadline = time.monotonic() + timeout
    while True:
        guest.raise_if_failed()
        status = read_status(guest.screen())
        if status is not None and (status.passes >= passes or status.errors):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"memtest did not complete pass {passes} within {timeout} s; "
                               f"screen:\n{guest.screen().text()}")
        time.sleep(_POLL)


@dataclass(frozen=True)
class PassRecord:
    """One completed pass: what vmm-swap was doing, and memtest's counters after it."""

    phase: str
    swap_state: str
    seconds: float
    status: MemtestStatus
    #: vmm-swap's page counters at the end of the pass (fault counters count since enable).
    metrics: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StepRecord:
    """One swap command: the state it reached, its time, and the pages it moved."""

    name: str
    state: str
    seconds: float
    pages: int


@dataclass
class SwapPassesResult:
    passes: list[PassRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    pages_swapped_out: int = 0
    #: vmm-swap's page counters at the end of the first pass while Active (faults since enable).
    active_metrics: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return max((p.status.errors for p in self.passes), default=0)


def run_swap_passes(guest: MemtestGuest, controller: SwapController, *, cycles: int = 1,
                    pass_timeout: float = 120.0, swap_timeout: float = 120.0,
                    report: Report | None = None) -> SwapPassesResult:
    """A clean pass; ``cycles`` times enable -> trim -> out and a full pass while Active; then
    disable and a pass (memtest running throughout). Stops at the first pass with errors."""
    say = report if report is not None else (lambda _: None)
    result = SwapPassesResult()
    passes = current_status(guest).passes

    def one_pass(phase: str) -> MemtestStatus:
        nonlocal passes
        start = time.monotonic()
        status = wait_for_pass(guest, passes + 1, pass_timeout)
        passes = status.passes
        swap = controller.status()
        metrics = {**swap.metrics.crosvm_dict(), **swap.metrics.readahead_dict()}
        result.passes.append(PassRecord(phase, str(swap.state), time.monotonic() - start,
                                        status, metrics))
        say(f"{phase}: pass {status.passes} done in {time.monotonic() - start:.1f} s, "
            f"swap {swap.state}, memtest errors {status.errors}")
        return status

    def step(name: str, action: Callable[[], SwapStatus]) -> SwapStatus:
        start = time.monotonic()
        status = action()
        seconds = time.monotonic() - start
        pages = int(status.state_transition.pages)
        result.steps.append(StepRecord(name, str(status.state), seconds, pages))
        say(f"{name}: {status.state} in {seconds:.2f} s ({pages} pages)")
        return status

    if one_pass("before swap").errors:
        return result
    for cycle in range(1, cycles + 1):
        step("enable", controller.enable)
        step("trim", lambda: controller.trim(wait=True, timeout=swap_timeout))
        out = step("swap out", lambda: controller.swap_out(wait=True, timeout=swap_timeout))
        if cycle == 1:
            result.pages_swapped_out = int(out.state_transition.pages)
        active = one_pass(f"while Active {cycle}")
        if cycle == 1:
            result.active_metrics = result.passes[-1].metrics
            say(f"vmm-swap counters after the Active pass: {result.active_metrics}")
        if active.errors:
            return result
    step("disable", lambda: controller.disable(wait=True, timeout=swap_timeout))
    one_pass("after disable")
    return result
