"""How the monitor shares its one thread between faults and background work (swap-out, swap-in).

Faults come first: a vCPU waiting on a page is a stalled guest, a chunk of swap-out is not. But
background work must not starve either: a guest that faults without pause (a balloon driver
touching what it just gave back, a slow disk) must not keep a disable from ever finishing.
These tests read the order of events the monitor logged (``INJECT_EVENT_LOG``), not times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from control_helpers import MIB, Model, TestVmm

pytestmark = pytest.mark.timeout(120)
#: The injector wraps the data plane's handler; the fake handler has nothing to order.
REAL_ONLY = pytest.mark.parametrize("handler_env", ["real"], indirect=True)
INJECT = {"VMMSWAP_TEST_HANDLER_FACTORY": "control_inject:factory", "INJECT_BASE": ""}


def served_between_chunks(events: list[str]) -> tuple[bool, str]:
    """Whether the first fault after the ``touch`` mark was served before the next chunk
    began, and had a chunk running when it arrived (else the test proved nothing)."""
    touch = events.index("touch")
    before = [e for e in events[:touch] if e.startswith("out-")]
    if not before:
        return False, "the fault came before swap-out began"
    if before[-1] != "out-begin":
        return False, "no chunk was being written when the fault came"
    for event in events[touch + 1:]:
        if event.startswith("fault"):
            return True, "served before the next chunk"
        if event == "out-begin":
            return False, "a new chunk began before the waiting fault was served"
    return False, "the fault was never logged"


def test_served_between_chunks_can_fail() -> None:
    """Negative controls of the checker: wrong orders are seen as wrong."""
    good = ["out-begin", "touch", "out-end 1", "fault 0x1", "out-begin", "out-end 1"]
    assert served_between_chunks(good) == (True, "served before the next chunk")
    late = ["out-begin", "touch", "out-end 1", "out-begin", "fault 0x1", "out-end 1"]
    assert not served_between_chunks(late)[0]
    idle = ["out-begin", "out-end 1", "touch", "fault 0x1", "out-begin"]
    assert not served_between_chunks(idle)[0]
    early = ["touch", "out-begin", "fault 0x1"]
    assert not served_between_chunks(early)[0]


def _events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []



def _logged_vmm(make_vmm: Callable[..., TestVmm], swap_dir: Path, log: Path, *, seed: int,
                **inject: str) -> tuple[TestVmm, Model]:
    """A VMM on the injecting monitor (``inject`` plus the event log at ``log``), without
    readahead so every fault is one event, with 4 MiB + 2 MiB written (seeds ``seed`` and
    ``seed + 1``)."""
    vmm = make_vmm(**INJECT, **inject, INJECT_EVENT_LOG=str(log))
    vmm.launch(swap_dir, readahead=False)
    model = Model(vmm)
    model.write(0, 0, 4 * MIB, seed=seed)
    model.write(1, 0, 2 * MIB, seed=seed + 1)
    return vmm, model


@REAL_ONLY
def test_out_yields_to_a_fault_between_chunks(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "events"
    vmm, model = _logged_vmm(make_vmm, swap_dir, log, seed=3, INJECT_OUT_CHUNK_DELAY_MS="150")
    vmm.ok("enable")
    vmm.ok("out", wait=False)
    deadline = time.monotonic() + 30
    while "out-begin" not in _events(log):  # a chunk is being written now (150 ms of it)
        assert time.monotonic() < deadline, "swap-out never began"
        time.sleep(0.005)
    with log.open("a") as f:
        f.write("touch\n")
    vmm.ok("read_async", name="r", region=1, offset=MIB, length=4096, seed=4)
    joined = vmm.ok("join", name="r", wait=30)
    assert not joined["blocked"] and joined["mismatched_pages"] == 0
    while vmm.ok("status")["status"]["state"] != "Active":
        assert time.monotonic() < deadline, "swap-out never finished"
        time.sleep(0.05)
    vmm.ok("disable")
    events = _events(log)
    ok, why = served_between_chunks(events)
    assert ok, f"{why}: {events}"
    assert events.count("out-begin") >= 3, events  # the swap-out really was several chunks
    model.verify()


def work_amid_faults(events: list[str], work: str) -> int:
    """How many chunks of ``work`` (an event prefix) ran between the first and the last
    fault: 0 when the faults starved the work until they stopped."""
    faults = [i for i, e in enumerate(events) if e.startswith("fault")]
    if len(faults) < 2:
        return 0
    return sum(1 for e in events[faults[0]:faults[-1]] if e.startswith(work))


def test_work_amid_faults_can_fail() -> None:
    starved = ["fault 0x1", "fault 0x2", "fault 0x3", "out-begin", "out-end 1"]
    assert work_amid_faults(starved, "out-begin") == 0
    shared = ["fault 0x1", "out-begin", "out-end 1", "fault 0x2"]
    assert work_amid_faults(shared, "out-begin") == 1


@REAL_ONLY
@pytest.mark.parametrize("phase", ["in", "out"])
def test_background_work_is_not_starved_by_faults_that_never_pause(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, tmp_path: Path, phase: str) -> None:
    """Every fault takes 5 ms (a slow disk) and three guest threads fault again the moment they
    are served, so a fault is always waiting. Swap-out and swap-in must still make progress
    while the faults go on (found by the torture harness: a disable waited for ever)."""
    log = tmp_path / "events"
    vmm, model = _logged_vmm(make_vmm, swap_dir, log, seed=5, INJECT_FAULT_DELAY_MS="5")
    vmm.ok("enable")
    if phase == "in":
        vmm.ok("out")
    # 1024 pages at 5 ms: about 5 s of faults, far longer than the work takes alone.
    vmm.ok("readers_start", region=0, length=4 * MIB, threads=3, seed=5)
    try:
        if phase == "out":
            assert vmm.ok("out", timeout=60)["status"]["state"] == "Active"
        else:
            assert vmm.ok("disable", timeout=60)["status"]["state"] == "Ready"
    finally:
        readers = vmm.ok("readers_stop")
    assert readers["mismatched_pages"] == 0, readers
    events = _events(log)
    work = "out-begin" if phase == "out" else "in-step"
    amid = work_amid_faults(events, work)
    assert amid >= 2, (f"only {amid} chunks of {phase} ran while faults were waiting: "
                       f"{events[:40]} ...")
    vmm.ok("disable")
    model.verify()
