"""A killed monitor is replaced: the successor takes over every page and every waiting fault.

Over the data plane's PageHandler (the fake handler keeps its pages in the dead process and
cannot be resumed). Guest memory is touched only by the test VMM's ctypes calls and its device
processes, under timeouts. Negative controls: a successor that skips the UFFDIO_WAKE leaves a
fault stuck, one that rebuilds instead of resuming the page state returns wrong pages.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from control_helpers import MIB, Model, TestVmm, pid_alive, wait_gone

from vmmswap.control.freeze import thread_states

pytestmark = pytest.mark.timeout(180)
INJECT = {"VMMSWAP_TEST_HANDLER_FACTORY": "control_inject:factory", "INJECT_BASE": ""}


@pytest.fixture
def real_vmm() -> Iterator[Callable[..., TestVmm]]:
    """Test VMMs over the data plane (the fake handler keeps its pages in the dead monitor)."""
    vmms: list[TestVmm] = []

    def make(**env: str) -> TestVmm:
        vmm = TestVmm(env=env)
        vmms.append(vmm)
        return vmm

    yield make
    for vmm in vmms:
        vmm.close()


def _restarts(vmm: TestVmm) -> dict[str, Any]:
    return vmm.ok("restarts")


def _wait_restarts(vmm: TestVmm, count: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = _restarts(vmm)
        if len(info["restarts"]) >= count or info["deaths"]:
            return info
        assert time.monotonic() < deadline, f"no restart {count} within {timeout} s: {info}"
        time.sleep(0.02)


def _kill_monitor(vmm: TestVmm) -> int:
    pid = int(_restarts(vmm)["monitor_pid"])
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid, 10)
    return pid


def _swapped_out(vmm: TestVmm) -> Model:
    model = Model(vmm)
    model.write(0, 0, 3 * MIB, seed=11)
    model.write(1, 256 * 1024, 1 * MIB, seed=12)
    vmm.ok("enable")
    status = vmm.ok("out")["status"]
    assert status["state"] == "Active" and status["metrics"]["swap_pages"] > 0, status
    return model


def test_killed_while_active_the_successor_serves_every_page(
        real_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = real_vmm()
    first = vmm.launch(swap_dir)
    model = _swapped_out(vmm)
    _kill_monitor(vmm)
    info = _wait_restarts(vmm, 1)
    assert info["deaths"] == [] and info["monitor_pid"] != first
    told = info["restarts"][0]
    assert told["count"] == 1 and told["dead_pid"] == first and told["exit_code"] == -9
    status = vmm.ok("status")["status"]
    assert status["state"] == "Active" and status["restarts"] == 1
    assert 0 < status["last_resume_seconds"] < 30
    model.verify()  # every page from the successor, through faults
    assert vmm.ok("disable")["status"]["state"] == "Ready"
    model.verify()


def _fault_then_kill(vmm: TestVmm) -> None:
    """A read of a swapped-out page; the monitor reads its fault, then sleeps (injected
    delay) and is killed before it answers."""
    vmm.ok("read_async", name="t", region=0, offset=0, length=4096, seed=11)
    time.sleep(0.4)  # the fault is read and waiting in the 1.5 s delay
    assert vmm.ok("join", name="t", wait=0.0)["blocked"]
    _kill_monitor(vmm)
    _wait_restarts(vmm, 1)


def test_a_fault_the_dead_monitor_read_is_raised_again(
        real_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = real_vmm(**INJECT, INJECT_FAULT_DELAY_MS="1500")
    vmm.launch(swap_dir)
    _swapped_out(vmm)
    _fault_then_kill(vmm)
    joined = vmm.ok("join", name="t", wait=20.0)
    assert not joined["blocked"], "the fault read by the dead monitor was never served"
    assert joined["mismatched_pages"] == 0, joined


def test_negative_control_without_the_wake_the_fault_stays_stuck(
        real_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = real_vmm(**INJECT, INJECT_FAULT_DELAY_MS="1500", INJECT_SKIP_WAKE="1")
    vmm.launch(swap_dir)
    _swapped_out(vmm)
    _fault_then_kill(vmm)
    # The successor serves new faults (this one takes the 1.5 s delay too) ...
    vmm.ok("read_async", name="u", region=1, offset=256 * 1024, length=4096, seed=12)
    other = vmm.ok("join", name="u", wait=20.0)
    assert not other["blocked"] and other["mismatched_pages"] == 0, other
    # ... but the fault its predecessor had read is never raised again.
    assert vmm.ok("join", name="t", wait=3.0)["blocked"]
    vmm.kill()  # a thread is stuck in a fault for good: the VMM cannot close cleanly


def test_negative_control_a_successor_that_rebuilds_its_state_returns_wrong_pages(
        real_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = real_vmm(**INJECT, INJECT_FRESH_ON_RESUME="1")
    vmm.launch(swap_dir)
    _swapped_out(vmm)
    _kill_monitor(vmm)
    _wait_restarts(vmm, 1)
    got = vmm.ok("verify", region=0, offset=0, length=3 * MIB, seed=11)
    assert got["mismatched_pages"] > 0 and got["zero_mismatches"] > 0, got


def test_two_deaths_in_a_row_and_a_dead_spare(real_vmm: Callable[..., TestVmm],
                                               swap_dir: Path) -> None:
    vmm = real_vmm()
    vmm.launch(swap_dir)
    model = _swapped_out(vmm)
    _kill_monitor(vmm)
    _wait_restarts(vmm, 1)
    _kill_monitor(vmm)  # the successor too, at once
    info = _wait_restarts(vmm, 2)
    assert len(info["restarts"]) == 2 and info["deaths"] == [], info
    # The spare killed together with the monitor: a fresh successor still takes over.
    spare = info["spare_pid"]
    deadline = time.monotonic() + 10
    while spare is None and time.monotonic() < deadline:
        time.sleep(0.05)
        spare = _restarts(vmm)["spare_pid"]
    assert spare is not None
    os.kill(spare, signal.SIGKILL)
    _kill_monitor(vmm)
    info = _wait_restarts(vmm, 3)
    assert len(info["restarts"]) == 3 and info["deaths"] == [], info
    assert vmm.ok("status")["status"]["restarts"] == 3
    model.verify()
    assert vmm.ok("disable")["status"]["state"] == "Ready"
    model.verify()


def test_a_crash_loop_trips_the_policy_and_faults_block(
        real_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = real_vmm()
    vmm.launch(swap_dir, max_restarts=2, window=60.0)
    _swapped_out(vmm)
    for n in (1, 2):
        _kill_monitor(vmm)
        assert len(_wait_restarts(vmm, n)["restarts"]) == n
    _kill_monitor(vmm)
    deadline = time.monotonic() + 20
    while not (info := _restarts(vmm))["deaths"]:
        assert time.monotonic() < deadline, "the third death in the window was not given up"
        time.sleep(0.02)
    assert len(info["restarts"]) == 2
    assert "restart policy allows 2" in info["deaths"][0], info["deaths"]
    result = vmm.call("status")
    assert not result["ok"] and result["error"] == "MonitorDiedError"
    # A swapped-out page blocks: never a zero page.
    vmm.ok("read_async", name="t", region=0, offset=0, length=4096, seed=11)
    assert vmm.ok("join", name="t", wait=2.0)["blocked"]
    result = vmm.call("close")
    assert not result["ok"] and result["error"] == "MonitorDiedError"
    assert vmm.ok("join", name="t", wait=1.0)["blocked"]
    assert _restarts(vmm)["spare_pid"] is None
    vmm.kill()


def _used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_the_vmm_dying_still_ends_everything(real_vmm: Callable[..., TestVmm],
                                             small_tmpfs: Path) -> None:
    vmm = real_vmm()
    sock = small_tmpfs / "ctl.sock"
    vmm.launch(small_tmpfs, control_socket=sock)
    model = Model(vmm)
    model.write(0, 0, 512 * 1024, seed=2)
    vmm.ok("enable")
    vmm.ok("out")
    _kill_monitor(vmm)
    _wait_restarts(vmm, 1)
    deadline = time.monotonic() + 10
    while (info := _restarts(vmm))["spare_pid"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    monitor, spare = info["monitor_pid"], info["spare_pid"]
    assert _used_bytes(small_tmpfs) >= 512 * 1024
    vmm.kill()
    assert wait_gone(monitor, 15), "the successor outlived its VMM"
    assert wait_gone(spare, 15), "the spare monitor outlived its VMM"
    assert _used_bytes(small_tmpfs) == 0, "the swap file outlived the VMM"
    assert not sock.exists()
    assert not pid_alive(vmm.pid)


def test_a_device_uffd_is_kept_by_the_vmm_and_served_by_the_successor(
        real_vmm: Callable[..., TestVmm], swap_dir: Path, tmp_path: Path) -> None:
    vmm = real_vmm()
    vmm.launch(swap_dir)
    model = _swapped_out(vmm)
    go = tmp_path / "go"
    pid = vmm.ok("fork_device", checks=[[0, 0, 3 * MIB, 11]], writes=[[1, 0, 64 * 1024, 13]],
                 wait_path=str(go))["pid"]
    deadline = time.monotonic() + 10
    while pid not in _restarts(vmm)["kept_devices"]:
        assert time.monotonic() < deadline, "the VMM never got the device's uffd"
        time.sleep(0.02)
    _kill_monitor(vmm)
    _wait_restarts(vmm, 1)
    assert vmm.ok("status")["status"]["devices"] == 1
    go.touch()  # only now does the device touch guest memory: the successor serves it
    assert vmm.ok("wait_device", pid=pid, timeout=60)["exit_code"] == 0
    model.seeds[1][:16] = [13] * 16
    while pid in _restarts(vmm)["kept_devices"]:
        assert time.monotonic() < deadline + 20, "the exited device's uffd was never dropped"
        time.sleep(0.02)
    model.verify()


def test_an_enable_killed_during_the_move_is_reported_and_consistent(
        real_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    """The VMM is frozen and the control area says the move began when the monitor dies: the
    thaw guard resumes the VMM, the successor serves in Pending, the enable is reported as
    interrupted (not redone), and every page is intact."""
    vmm = real_vmm(**INJECT, INJECT_SLOW_MOVE_MS="2500")
    monitor = vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 2 * MIB, seed=21)
    assert vmm.proc.stdin is not None
    vmm.proc.stdin.write(json.dumps({"op": "enable"}) + "\n")
    vmm.proc.stdin.flush()
    deadline = time.monotonic() + 20
    while not all(s == "T" for s in thread_states(vmm.pid).values()):
        assert time.monotonic() < deadline, "enable never froze the VMM"
        time.sleep(0.01)
    time.sleep(0.5)  # registered, and the area says the move began (it waits 2.5 s first)
    os.kill(monitor, signal.SIGKILL)
    result = vmm._readline(60)
    assert not result["ok"] and result["error"] == "MonitorRestartedError", result
    assert "enable was interrupted" in result["message"]
    status = vmm.ok("status")["status"]
    assert status["state"] == "Pending" and "run enable again" in status["error"], status
    model.verify()
    assert vmm.ok("enable")["status"]["state"] == "Pending"
    model.verify()
    assert vmm.ok("disable")["status"]["state"] == "Ready"
    model.verify()


def test_an_out_killed_midway_is_resumed_by_the_successor(
        real_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = real_vmm(**INJECT, INJECT_OUT_CHUNK_DELAY_MS="400")
    vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 4 * MIB, seed=31)
    model.write(1, 0, 2 * MIB, seed=32)
    vmm.ok("enable")
    assert vmm.ok("out", wait=False)["status"]["state"] == "SwapOutInProgress"
    time.sleep(0.6)  # the first chunk is written, the second in its delay
    _kill_monitor(vmm)
    _wait_restarts(vmm, 1)
    status = vmm.ok("status")["status"]
    assert status["state"] in ("SwapOutInProgress", "Active"), status
    deadline = time.monotonic() + 30
    while status["state"] != "Active":
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
        status = vmm.ok("status")["status"]
    assert status["metrics"]["swap_pages"] == 6 * MIB // 4096 and \
        status["metrics"]["staging_pages"] == 0, status
    model.verify()
