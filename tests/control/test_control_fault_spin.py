"""The monitor's adaptive spin after a fault (control/fault_spin.py): it serves what arrives
while spinning, ends when faults stop (or at its cap), adapts its window, and leaves the
monitor blocked in epoll once the guest is idle. A fake clock makes every unit test
independent of timing."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from control_helpers import MIB, Model, TestVmm
from test_control_faults import BASE, REGION, FakeUffd, Handler, fault

from vmmswap.control.fault_spin import AdaptiveSpin
from vmmswap.control.monitor_faults import UffdEntry, UffdSet

pytestmark = pytest.mark.timeout(120)

US = 1e-6


class FakeClock:
    """Advances by ``step`` seconds at every reading."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def make_spin(step: float = 1 * US, **kwargs: float) -> tuple[AdaptiveSpin, FakeClock]:
    clock = FakeClock(step)
    args: dict[str, float] = {"min_window": 10 * US, "max_window": 80 * US, "window": 40 * US,
                              "max_spin": 1e-3, **kwargs}
    return AdaptiveSpin(clock=clock, **args), clock


def test_spin_ends_after_a_window_without_faults_and_shrinks_the_window() -> None:
    spin, clock = make_spin()
    polls: list[float] = []
    assert spin.spin(lambda: polls.append(clock.now) or 0) == 0
    # One window (40 us) of 1-us polls, then it stops: not a poll more.
    assert 35 <= len(polls) <= 41
    assert spin.window == pytest.approx(20 * US)
    assert spin.stats.spins == 1 and spin.stats.caught == 0
    spin.spin(lambda: 0)
    spin.spin(lambda: 0)
    assert spin.window == pytest.approx(10 * US)  # never below min_window


def test_each_fault_restarts_the_window_and_grows_it() -> None:
    spin, _ = make_spin()
    arrivals = [0] * 30 + [1] + [0] * 30 + [2]  # faults 31 and 62 polls in: both within a window
    calls = 0

    def poll() -> int:
        nonlocal calls
        calls += 1
        return arrivals.pop(0) if arrivals else 0

    assert spin.spin(poll) == 3
    # It kept spinning a full window after the last fault, then stopped.
    assert 62 + 35 <= calls <= 62 + 41
    assert spin.window == pytest.approx(80 * US)
    assert spin.stats.caught == 3


def test_a_fault_arriving_after_the_window_is_left_to_epoll() -> None:
    spin, _ = make_spin()
    arrivals = [0] * 60 + [1]  # 60 us later: after a 40-us window
    assert spin.spin(lambda: arrivals.pop(0) if arrivals else 0) == 0
    assert arrivals[-1] == 1 and len(arrivals) >= 19  # never polled that far


def test_a_continuous_stream_stops_at_the_cap() -> None:
    spin, clock = make_spin(max_spin=500 * US)
    calls = 0

    def poll() -> int:
        nonlocal calls
        calls += 1
        return 1  # a fault every poll, forever

    assert spin.spin(poll) == calls
    assert clock.now <= 502 * US
    assert 490 <= calls <= 501


def test_disabled_never_polls() -> None:
    spin = AdaptiveSpin.disabled()
    assert not spin.enabled
    assert spin.spin(lambda: pytest.fail("polled")) == 0  # type: ignore[func-returns-value]


@pytest.mark.parametrize("kwargs", [{"min_window": 2.0, "max_window": 1.0},
                                    {"min_window": -1.0}, {"max_spin": -1.0}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdaptiveSpin(**kwargs)  # type: ignore[arg-type]


def test_spinning_over_the_uffd_set_serves_every_fault_once() -> None:
    uffd = FakeUffd()
    handler = Handler()
    main = UffdEntry(uffd, 1, main=True)  # type: ignore[arg-type]
    uffds = UffdSet([REGION], main, lambda: handler,  # type: ignore[arg-type,return-value]
                    lambda e: None)
    # The burst: faults arrive one read at a time, with empty reads in between.
    uffd.queue = [[fault(1)], [], [], [fault(2), fault(3)], [], [fault(4)]]
    spin, _ = make_spin()
    assert spin.spin(lambda: uffds.serve(main)) == 4
    assert handler.served == [BASE + n * 4096 for n in (1, 2, 3, 4)]
    assert uffds.stuck_count == 0


# --- the monitor process ----------------------------------------------------------------------
def sleeping_in_epoll(pid: int) -> bool:
    """True when every thread of ``pid`` sleeps, the main one in epoll_wait."""
    task = Path(f"/proc/{pid}/task")
    for tid in task.iterdir():
        state = (tid / "stat").read_text().rpartition(")")[2].split()[0]
        if state != "S":
            return False
    return (task / str(pid) / "wchan").read_text().strip() == "do_epoll_wait"


def eventually(check: Callable[[], bool], timeout: float = 20.0, times: int = 5) -> bool:
    """``check`` held ``times`` samples in a row before ``timeout``."""
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline:
        streak = streak + 1 if check() else 0
        if streak >= times:
            return True
        time.sleep(0.05)
    return False


def test_negative_control_a_busy_process_is_not_sleeping_in_epoll() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert not eventually(lambda: sleeping_in_epoll(busy.pid), timeout=2.0)
    finally:
        busy.kill()
        busy.wait()


def test_monitor_blocks_in_epoll_once_faults_stop(make_vmm: Callable[..., TestVmm],
                                                  swap_dir: Path) -> None:
    vmm = make_vmm()
    pid = vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 2 * MIB, seed=5)
    vmm.ok("enable")
    vmm.ok("out")
    model.verify()  # faults every page back in: the monitor spins after each burst
    assert eventually(lambda: sleeping_in_epoll(pid)), "the monitor kept running while idle"
    model.verify()
