"""crosvm's controller scenarios (enable, out, trim, disable), each repeated after the guest
writes more pages, on a test VMM with two memfd regions; every page's content is checked."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from control_helpers import MIB, Model, TestVmm, wait_gone

from vmmswap.uffd.pagesize import PAGE_SIZE

pytestmark = pytest.mark.timeout(120)

KIB = 1024


def _status(result: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = result["status"]
    return status


def _start(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> tuple[TestVmm, Model]:
    vmm = make_vmm()
    vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 1 * MIB, seed=1)
    model.write(0, 2 * MIB, 512 * KIB, seed=2)
    model.write(1, 256 * KIB, 1 * MIB, seed=3)
    return vmm, model


def test_launch_reports_ready(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    status = _status(vmm.ok("status"))
    assert status["state"] == "Ready"
    assert status["metrics"]["resident_pages"] == model.written_pages()
    assert status["metrics"]["staging_pages"] == 0


def test_enable(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    written = model.written_pages()
    status = _status(vmm.ok("enable"))
    assert status["state"] == "Pending"
    assert status["state_transition"]["pages"] == written
    assert status["metrics"]["staging_pages"] == written
    assert status["metrics"]["resident_pages"] == 0
    model.verify()
    status = _status(vmm.ok("status"))
    assert status["metrics"]["copied_from_staging_pages"] == written
    # Again, after the guest wrote more: only what is resident now moves.
    model.write(1, 0, 64 * KIB, seed=4)
    resident = _status(vmm.ok("status"))["metrics"]["resident_pages"]
    status = _status(vmm.ok("enable"))
    assert status["state"] == "Pending"
    assert status["state_transition"]["pages"] == resident
    assert status["metrics"]["copied_from_staging_pages"] == 0  # counters restart at enable
    model.verify()


def test_swap_out(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    written = model.written_pages()
    vmm.ok("enable")
    status = _status(vmm.ok("out"))
    assert status["state"] == "Active"
    assert status["state_transition"]["pages"] == written
    assert status["metrics"]["staging_pages"] == 0
    assert status["metrics"]["swap_pages"] == written
    model.verify()
    assert _status(vmm.ok("status"))["metrics"]["copied_from_file_pages"] == written
    model.write(0, 3 * MIB, 256 * KIB, seed=5)
    vmm.ok("enable")
    status = _status(vmm.ok("out"))
    assert status["state"] == "Active" and status["metrics"]["staging_pages"] == 0
    model.verify()


def test_trim(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    zero_pages = 16
    vmm.ok("write", region=1, offset=1536 * KIB, length=zero_pages * PAGE_SIZE, seed=0)
    vmm.ok("enable")
    status = _status(vmm.ok("trim"))
    assert status["state"] == "Pending"
    assert status["state_transition"]["pages"] >= zero_pages  # the zero pages were trimmed
    assert status["metrics"]["staging_pages"] == model.written_pages()
    model.verify()
    # Again after more writes, and with out in between.
    model.write(0, 1 * MIB, 128 * KIB, seed=6)
    vmm.ok("enable")
    vmm.ok("out")
    model.verify()
    vmm.ok("enable")
    status = _status(vmm.ok("trim"))
    assert status["state"] == "Pending"
    model.verify()


def test_trim_and_out_are_refused_in_wrong_states(make_vmm: Callable[..., TestVmm],
                                                  swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    for op in ("trim", "out"):
        result = vmm.call(op)
        assert not result["ok"] and result["error"] == "SwapStateError"
        assert "enable first" in result["message"]
    vmm.ok("enable")
    vmm.ok("out")
    for op in ("trim", "out"):
        result = vmm.call(op)
        assert not result["ok"] and result["error"] == "SwapStateError"
        assert result["status"]["state"] == "Active"
    model.verify()


def test_disable(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    written = model.written_pages()
    vmm.ok("enable")
    vmm.ok("out")
    status = _status(vmm.ok("disable"))
    assert status["state"] == "Ready"
    assert status["state_transition"]["pages"] == written
    assert status["metrics"]["resident_pages"] == written
    assert status["metrics"]["swap_pages"] == 0 and status["metrics"]["staging_pages"] == 0
    model.verify()
    model.write(1, 0, 128 * KIB, seed=7)
    vmm.ok("enable")
    status = _status(vmm.ok("disable", slow_file_cleanup=True))  # from Pending
    assert status["state"] == "Ready"
    model.verify()
    vmm.ok("enable")
    vmm.ok("out")
    vmm.ok("disable")
    model.verify()


def test_enable_while_swapping_in_and_trimming(make_vmm: Callable[..., TestVmm],
                                               swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    vmm.ok("enable")
    vmm.ok("out")
    vmm.ok("disable", wait=False)
    status = _status(vmm.ok("enable"))
    assert status["state"] == "Pending"
    vmm.ok("trim", wait=False)
    assert _status(vmm.ok("enable"))["state"] == "Pending"
    vmm.ok("out", wait=False)
    assert _status(vmm.ok("enable"))["state"] == "Pending"
    model.verify()
    vmm.ok("disable")
    model.verify()


def test_cycles_end_with_every_page_intact(make_vmm: Callable[..., TestVmm],
                                           swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    for cycle in range(3):
        vmm.ok("enable")
        model.write(0, (cycle + 1) * 256 * KIB, 64 * KIB, seed=10 + cycle)  # from staging
        vmm.ok("trim")
        vmm.ok("out")
        model.write(1, cycle * 128 * KIB, 96 * KIB, seed=20 + cycle)  # faults from the file
        vmm.ok("enable")
        vmm.ok("out")
        vmm.ok("disable")
        status = _status(vmm.ok("status"))
        assert status["state"] == "Ready"
    model.verify()
    vmm.ok("close")
    model.verify()  # after close, memory is plain memory again


def test_close_while_active_swaps_everything_in(make_vmm: Callable[..., TestVmm],
                                                swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    vmm.ok("enable")
    vmm.ok("out")
    vmm.ok("close")
    model.verify()
    result = vmm.call("status")
    assert not result["ok"] and "closed" in result["message"]


def test_remove_events_drop_swapped_pages(make_vmm: Callable[..., TestVmm],
                                          swap_dir: Path) -> None:
    """A balloon-style MADV_REMOVE while pages are in staging and in the file: the monitor reads
    the REMOVE event (the madvise waits for it), and the removed pages read as zeros after."""
    vmm, model = _start(make_vmm, swap_dir)
    vmm.ok("enable")
    vmm.ok("out")
    vmm.ok("remove", region=0, offset=0, length=256 * KIB)  # swapped-out pages
    for page in range(256 * KIB // PAGE_SIZE):
        model.seeds[0][page] = 0
    vmm.ok("enable")
    vmm.ok("remove", region=1, offset=256 * KIB, length=128 * KIB)  # staged pages
    for page in range(64, 64 + 128 * KIB // PAGE_SIZE):
        model.seeds[1][page] = 0
    status = _status(vmm.ok("status"))
    assert status["metrics"]["swap_pages"] + status["metrics"]["staging_pages"] == \
        model.written_pages()
    model.verify()
    vmm.ok("disable")
    model.verify()


def test_writer_thread_during_enable_loses_nothing(make_vmm: Callable[..., TestVmm],
                                                   swap_dir: Path) -> None:
    """A VMM thread rewrites memory non-stop while enable freezes and moves it (crosvm's
    virtio-blk bug, commit aa49f2918): its last complete write must be what the guest holds."""
    vmm, model = _start(make_vmm, swap_dir)
    vmm.ok("writer_start", region=0, offset=1 * MIB, length=1 * MIB)
    for _ in range(3):
        vmm.ok("enable")
        vmm.ok("out", wait=False)
    seed = vmm.ok("writer_stop")["seed"]
    assert seed > 0
    for page in range(MIB // PAGE_SIZE, 2 * MIB // PAGE_SIZE):
        model.seeds[0][page] = seed
    model.verify()
    vmm.ok("disable")
    model.verify()


def test_slow_file_cleanup_shrinks_the_file_in_steps(make_vmm: Callable[..., TestVmm],
                                                     swap_dir: Path) -> None:
    vmm = make_vmm(VMMSWAP_TRUNCATE_STEP=str(256 * KIB), VMMSWAP_TRUNCATE_INTERVAL="0.3")
    monitor = vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 2 * MIB, seed=1)

    def swap_file_size() -> int:
        for fd in os.listdir(f"/proc/{monitor}/fd"):
            link = os.readlink(f"/proc/{monitor}/fd/{fd}")
            if link.startswith(str(swap_dir)) and link.endswith("(deleted)"):
                return os.stat(f"/proc/{monitor}/fd/{fd}").st_size
        raise AssertionError("no swap file among the monitor's descriptors")

    vmm.ok("enable")
    vmm.ok("out")
    assert swap_file_size() >= 2 * MIB
    vmm.ok("disable", slow_file_cleanup=True)
    sizes = [swap_file_size()]
    deadline = time.monotonic() + 30
    while sizes[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
        if swap_file_size() != sizes[-1]:
            sizes.append(swap_file_size())
    assert sizes[0] >= 2 * MIB and sizes[-1] == 0
    assert len(sizes) >= 4, f"expected gradual steps, got {sizes}"
    model.verify()


def test_dropping_the_controller_swaps_in_and_stops_the_monitor(
        make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _start(make_vmm, swap_dir)
    vmm.ok("enable")
    vmm.ok("out")
    monitor = vmm.monitor_pid
    vmm.ok("drop")
    assert wait_gone(monitor, 30)
    vmm.monitor_pid = 0
    model.verify()
