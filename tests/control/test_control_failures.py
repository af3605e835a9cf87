"""The failure policy, each failure injected: monitor killed, VMM killed, disk full, I/O errors,
a failed move. Nothing may ever come back as a zero page where data was."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from control_helpers import FAKE_FACTORY, MIB, Model, TestVmm, wait_gone

from vmmswap.control.controller import NO_RESTART, MonitorDiedError, SwapController
from vmmswap.control.freeze import thread_states
from vmmswap.dataplane.guest_memory import GuestMemory

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def inject_env(handler_env: dict[str, str]) -> dict[str, str]:
    return {"VMMSWAP_TEST_HANDLER_FACTORY": "control_inject:factory",
            "INJECT_BASE": handler_env.get("VMMSWAP_TEST_HANDLER_FACTORY", "")}


def _used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_monitor_killed_faults_block_and_controller_reports(
        make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = make_vmm()
    monitor = vmm.launch(swap_dir, max_restarts=0)  # the old policy: nobody takes over
    model = Model(vmm)
    model.write(0, 0, 1 * MIB, seed=1)
    vmm.ok("enable")
    vmm.ok("out")
    os.kill(monitor, signal.SIGKILL)
    assert wait_gone(monitor, 10)
    # A thread touching a swapped-out page blocks: it is never handed a zero page.
    vmm.ok("read_async", name="t", region=0, offset=0, length=64 * 1024, seed=1)
    joined = vmm.ok("join", name="t", wait=2.0)
    assert joined["blocked"], f"a fault on a swapped page resolved without the monitor: {joined}"
    result = vmm.call("status")
    assert not result["ok"] and result["error"] == "MonitorDiedError"
    assert "killed by signal 9" in result["message"] and "Stop the VM" in result["message"]
    # close() reports it too, and keeps the uffd open (closing it would zero-fill the pages).
    result = vmm.call("close")
    assert not result["ok"] and result["error"] == "MonitorDiedError"
    assert vmm.ok("join", name="t", wait=1.0)["blocked"]


def test_monitor_killed_while_ready_loses_nothing(make_vmm: Callable[..., TestVmm],
                                                  swap_dir: Path) -> None:
    vmm = make_vmm()
    monitor = vmm.launch(swap_dir, max_restarts=0)
    model = Model(vmm)
    model.write(1, 0, 256 * 1024, seed=4)
    os.kill(monitor, signal.SIGKILL)
    assert wait_gone(monitor, 10)
    assert vmm.call("status")["error"] == "MonitorDiedError"
    vmm.ok("close")  # nothing was registered: the uffd can be released
    model.verify()


def test_vmm_killed_monitor_exits_and_swap_file_disappears(
        make_vmm: Callable[..., TestVmm], small_tmpfs: Path) -> None:
    vmm = make_vmm()
    sock = small_tmpfs / "ctl.sock"
    monitor = vmm.launch(small_tmpfs, control_socket=sock)
    model = Model(vmm)
    model.write(0, 0, 512 * 1024, seed=2)
    vmm.ok("enable")
    vmm.ok("out")
    assert _used_bytes(small_tmpfs) >= 512 * 1024  # the swap file holds the pages
    vmm.kill()
    assert wait_gone(monitor, 15), "the monitor outlived its VMM"
    assert _used_bytes(small_tmpfs) == 0, "the swap file outlived the monitor"
    assert not sock.exists()


def test_disk_full_during_out_is_failed_and_loses_nothing(
        make_vmm: Callable[..., TestVmm], small_tmpfs: Path) -> None:
    vmm = make_vmm()
    vmm.launch(small_tmpfs)
    model = Model(vmm)
    model.write(0, 0, 3 * MIB, seed=5)  # three times the 1 MiB tmpfs
    model.write(1, 0, 512 * 1024, seed=6)
    vmm.ok("enable")
    result = vmm.call("out")
    assert not result["ok"] and result["error"] == "SwapFailedError", result
    status = vmm.ok("status")["status"]
    assert status["state"] == "Failed"
    assert "No space left" in status["error"]
    for op in ("trim", "out"):
        assert vmm.call(op)["error"] == "SwapStateError"
    model.verify()  # served from staging and the file while Failed
    assert vmm.ok("disable")["status"]["state"] == "Ready"
    model.verify()
    # Failed is not terminal: a new enable works (the file is empty again after disable).
    assert vmm.ok("enable")["status"]["state"] == "Pending"
    model.verify()


def test_io_error_during_out_is_failed_and_loses_nothing(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, inject_env: dict[str, str]) -> None:
    vmm = make_vmm(**inject_env, INJECT_EIO_OUT_AFTER="1")
    vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 3 * MIB, seed=7)
    vmm.ok("enable")
    result = vmm.call("out")
    assert not result["ok"] and result["status"]["state"] == "Failed"
    assert "injected I/O error" in result["status"]["error"]
    status = vmm.ok("status")["status"]
    assert status["metrics"]["swap_pages"] > 0 and status["metrics"]["staging_pages"] > 0
    vmm.ok("disable")
    model.verify()


def test_failed_move_is_failed_and_disable_brings_pages_back(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, inject_env: dict[str, str]) -> None:
    vmm = make_vmm(**inject_env, INJECT_EIO_MOVE="1")
    vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 1 * MIB, seed=8)
    model.write(1, 0, 1 * MIB, seed=9)
    result = vmm.call("enable")
    assert not result["ok"] and result["error"] == "SwapFailedError"
    assert result["status"]["state"] == "Failed"
    status = vmm.ok("status")["status"]
    assert status["state_transition"] == {"pages": 0, "time_ms": 0}
    model.verify()  # pages in staging are served while Failed
    assert vmm.ok("disable")["status"]["state"] == "Ready"
    model.verify()


def test_bad_swap_dir_fails_launch_clearly(make_vmm: Callable[..., TestVmm],
                                           tmp_path: Path) -> None:
    vmm = make_vmm()
    result = vmm.call("launch", swap_dir=str(tmp_path / "missing"))
    assert not result["ok"] and "not a directory" in result["message"]


def test_fault_that_cannot_be_served_blocks_then_recovers(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, inject_env: dict[str, str]) -> None:
    """A read error on the fault path must never become a zero page: the thread waits, the
    error shows in the status, and the fault is retried until it succeeds."""
    vmm = make_vmm(**inject_env, INJECT_EIO_FAULTS="3")
    vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 256 * 1024, seed=3)
    vmm.ok("enable")
    vmm.ok("out")
    vmm.ok("read_async", name="t", region=0, offset=0, length=4096, seed=3)
    first = vmm.ok("join", name="t", wait=0.5)
    status = vmm.ok("status")["status"]
    assert "injected I/O error" in (status["error"] or "")
    assert first["blocked"]
    done = vmm.ok("join", name="t", wait=10)
    assert not done["blocked"] and done["mismatched_pages"] == 0
    model.verify()


def test_bug_handling_remove_keeps_the_monitor_serving(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, inject_env: dict[str, str]) -> None:
    """An unexpected exception on the event path is reported, and the monitor -- which holds
    the only copy of the staged pages -- keeps serving every other fault."""
    vmm = make_vmm(**inject_env, INJECT_BUG_REMOVE="1")
    monitor = vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 2 * MIB, seed=11)
    model.write(1, 0, 1 * MIB, seed=12)
    vmm.ok("enable")
    vmm.ok("remove", region=0, offset=2 * MIB, length=1 * MIB)  # a never-written range
    model.verify()
    vmm.ok("out")
    model.verify()
    assert vmm.ok("disable")["status"]["state"] == "Ready"
    model.verify()
    os.kill(monitor, 0)  # still alive


def test_monitor_killed_during_enable_thaws_the_vmm(
        make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    """The VMM is SIGSTOPped while the monitor moves memory; if the monitor dies then, its thaw
    guard resumes the VMM, which learns of the death instead of staying stopped for good."""
    vmm = make_vmm(VMMSWAP_TEST_HANDLER_FACTORY=FAKE_FACTORY, FAKE_SLOW_MOVE="30")
    monitor = vmm.launch(swap_dir, max_restarts=0)
    assert vmm.proc.stdin is not None
    vmm.proc.stdin.write(json.dumps({"op": "enable"}) + "\n")
    vmm.proc.stdin.flush()
    deadline = time.monotonic() + 20
    while not all(s == "T" for s in thread_states(vmm.pid).values()):
        assert time.monotonic() < deadline, "enable never froze the VMM"
        time.sleep(0.01)
    os.kill(monitor, signal.SIGKILL)
    assert wait_gone(monitor, 10)
    while any(s == "T" for s in thread_states(vmm.pid).values()):
        assert time.monotonic() < deadline + 10, "the VMM stayed stopped after the monitor died"
        time.sleep(0.01)
    result = vmm._readline(30)
    assert not result["ok"] and result["error"] == "MonitorDiedError", result
    assert vmm.call("status")["error"] == "MonitorDiedError"


def test_controller_reports_a_monitor_death_as_it_happens(tmp_path: Path) -> None:
    """The VMM learns of a dead monitor without making a request: its vCPUs may all be
    blocked in faults. (In-process: nothing here ever touches registered memory.)"""
    deaths: list[MonitorDiedError] = []
    told = threading.Event()

    def on_death(err: MonitorDiedError) -> None:
        deaths.append(err)
        told.set()

    with GuestMemory.create([(0, 1 * MIB)]) as memory:
        ctl = SwapController.launch(memory, tmp_path, on_monitor_died=on_death,
                                    restart_policy=NO_RESTART)
        os.kill(ctl.monitor_pid, signal.SIGKILL)
        assert told.wait(10), "the controller did not notice the monitor's death"
        assert "killed by signal 9" in str(deaths[0])
        assert not ctl.monitor_alive()
        with pytest.raises(MonitorDiedError):
            ctl.status()
        ctl.close()  # nothing was registered: the uffd can go
    assert len(deaths) == 1


def test_orderly_close_is_not_reported_as_a_death(tmp_path: Path) -> None:
    deaths: list[MonitorDiedError] = []
    with GuestMemory.create([(0, 1 * MIB)]) as memory:
        with SwapController.launch(memory, tmp_path, on_monitor_died=deaths.append):
            pass
        time.sleep(0.2)
    assert deaths == []


def test_close_from_the_death_callback_races_the_vmm_safely(tmp_path: Path) -> None:
    """The README's advice -- stop the VM from on_monitor_died -- closes the controller on the
    watch thread, maybe while the VMM's own thread closes it too: neither may fail."""
    errors: list[BaseException] = []
    holder: dict[str, SwapController] = {}

    def on_death(_: MonitorDiedError) -> None:
        try:
            holder["ctl"].close()
        except BaseException as exc:
            errors.append(exc)

    with GuestMemory.create([(0, 1 * MIB)]) as memory:
        for attempt in range(6):
            holder["ctl"] = ctl = SwapController.launch(memory, tmp_path,
                                                        on_monitor_died=on_death,
                                                        restart_policy=NO_RESTART)
            os.kill(ctl.monitor_pid, signal.SIGKILL)
            time.sleep(attempt * 0.02)  # from "VMM first" to "callback first"
            ctl.close()  # nothing registered: no error, whoever gets there first
            # The callback ran (its close waited or returned) or was skipped: close() had begun.
            assert not ctl.monitor_alive()
        time.sleep(0.5)
    assert errors == []
