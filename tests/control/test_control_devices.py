"""Device processes: forked from the VMM, they register their own uffd with the monitor and wait
for its answer before touching guest memory; hot-plugged ones come and go and are collected."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from control_helpers import MIB, Model, TestVmm

pytestmark = pytest.mark.timeout(120)


def _devices(vmm: TestVmm) -> int:
    devices: int = vmm.ok("status")["status"]["devices"]
    return devices


def _wait_devices(vmm: TestVmm, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _devices(vmm) != count:
        assert time.monotonic() < deadline, f"device count stayed {_devices(vmm)}, not {count}"
        time.sleep(0.02)


@pytest.mark.parametrize("via", ["prepare", "connect"])
def test_device_faults_swapped_pages_through_its_own_uffd(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, via: str) -> None:
    vmm = make_vmm()
    vmm.launch(swap_dir, control_socket=swap_dir / "ctl.sock")
    model = Model(vmm)
    model.write(0, 0, 2 * MIB, seed=1)
    model.write(1, 0, 1 * MIB, seed=2)
    vmm.ok("enable")
    vmm.ok("out")
    # The device reads swapped pages (its faults arrive on its uffd) and writes new ones.
    pid = vmm.ok("fork_device", via=via, checks=[[0, 0, 2 * MIB, 1]],
                 writes=[[1, 0, 256 * 1024, 3]])["pid"]
    assert vmm.ok("wait_device", pid=pid)["exit_code"] == 0
    for page in range(256 * 1024 // 4096):
        model.seeds[1][page] = 3
    status = vmm.ok("status")["status"]
    assert status["metrics"]["copied_from_file_pages"] >= 2 * MIB // 4096
    _wait_devices(vmm, 0)  # its uffd was collected when it exited
    model.verify()
    vmm.ok("disable")
    model.verify()


def test_device_registered_while_ready_is_served_after_enable(
        make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = make_vmm()
    vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 1 * MIB, seed=4)
    go = swap_dir / "go"
    pid = vmm.ok("fork_device", checks=[[0, 0, 1 * MIB, 4]], writes=[[0, 1 * MIB, 64 * 1024, 5]],
                 wait_path=str(go))["pid"]
    _wait_devices(vmm, 1)
    vmm.ok("enable")  # freezes the device too, and registers the regions on its uffd
    vmm.ok("out")
    go.touch()
    assert vmm.ok("wait_device", pid=pid)["exit_code"] == 0
    for page in range(256, 256 + 16):
        model.seeds[0][page] = 5
    model.verify()


def test_hotplugged_devices_come_and_go(make_vmm: Callable[..., TestVmm],
                                        swap_dir: Path) -> None:
    vmm = make_vmm()
    vmm.launch(swap_dir, control_socket=swap_dir / "ctl.sock")
    model = Model(vmm)
    model.write(1, 0, 2 * MIB, seed=6)
    vmm.ok("enable")
    vmm.ok("out")
    go = swap_dir / "go"
    pids = [vmm.ok("fork_device", via="connect" if i % 2 else "prepare",
                   checks=[[1, i * 256 * 1024, 256 * 1024, 6]], writes=[],
                   wait_path=str(go))["pid"] for i in range(4)]
    _wait_devices(vmm, 4)
    go.touch()
    for pid in pids:
        assert vmm.ok("wait_device", pid=pid)["exit_code"] == 0
    _wait_devices(vmm, 0)
    model.verify()


def test_registration_refused_makes_the_device_exit(make_vmm: Callable[..., TestVmm],
                                                    swap_dir: Path) -> None:
    """The monitor cannot register guest memory on a device that does not map it: it answers
    False and the device exits(1) without touching guest memory (crosvm's policy)."""
    vmm = make_vmm()
    vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 256 * 1024, seed=7)
    vmm.ok("enable")
    pid = vmm.ok("fork_device", checks=[[0, 0, 256 * 1024, 7]], writes=[],
                 unmap_region=1)["pid"]
    assert vmm.ok("wait_device", pid=pid)["exit_code"] == 1
    assert _devices(vmm) == 0
    status = vmm.ok("status")["status"]
    assert status["state"] == "Pending"
    model.verify()
