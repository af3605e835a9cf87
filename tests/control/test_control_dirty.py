"""Dirty tracking across swap cycles on the test VMM: cycle 2 writes only what changed, and
every page of every cycle comes back with the content last written (through the VMM's threads
and through a device process)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from control_helpers import MIB, Model, TestVmm

from vmmswap.control.monitor_registration import Registration
from vmmswap.dataplane.dirty import probe_tracking
from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.uffd.pagesize import PAGE_SIZE

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not probe_tracking().available,
                                 reason=f"no dirty tracking here: {probe_tracking().reason}")]

KIB = 1024


@pytest.fixture
def handler_env() -> dict[str, str]:
    """The data plane's PageHandler only: the fake handler keeps no pages to track."""
    return {}


def _status(result: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = result["status"]
    return status


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _cycle_one(make_vmm: Callable[..., TestVmm], swap_dir: Path,
               **launch: Any) -> tuple[TestVmm, Model]:
    vmm = make_vmm()
    vmm.launch(swap_dir, dirty_tracking=True, **launch)
    model = Model(vmm)
    model.write(0, 0, 3 * MIB, seed=1)
    model.write(1, 0, 1 * MIB, seed=2)
    vmm.ok("enable")
    vmm.ok("out")
    status = _status(vmm.ok("disable"))
    assert status["state"] == "Ready"
    model.verify()  # every page back, and (since disable filled them) not written since
    return vmm, model


def test_second_cycle_writes_only_what_changed(make_vmm: Callable[..., TestVmm],
                                              swap_dir: Path) -> None:
    vmm, model = _cycle_one(make_vmm, swap_dir)
    data_pages = model.written_pages()
    status = _status(vmm.ok("status"))
    tracking = status["dirty_tracking"]
    assert tracking["mode"] == "wp-async"
    assert tracking["kept_pages"] == data_pages
    # The guest rewrites 64 KiB in each of two places; another 256 KiB is read only.
    model.write(0, 512 * KIB, 64 * KIB, seed=3)
    model.write(1, 128 * KIB, 64 * KIB, seed=4)
    model.verify()
    # Reading never-written pages made them resident (shmem fills a hole it is read at):
    # they were never in the file, so they move to staging as before.
    resident = _status(vmm.ok("status"))["metrics"]["resident_pages"]
    status = _status(vmm.ok("enable"))
    tracking = status["dirty_tracking"]
    rewritten = 2 * 64 * KIB // PAGE_SIZE
    assert tracking["dirty_pages"] == rewritten
    assert tracking["released_pages"] == data_pages - rewritten
    assert status["metrics"]["staging_pages"] == resident - (data_pages - rewritten)
    assert status["metrics"]["swap_pages"] == data_pages - rewritten
    assert status["metrics"]["resident_pages"] == 0
    status = _status(vmm.ok("trim"))  # the zero pages go; the rewritten ones stay
    assert status["metrics"]["staging_pages"] == rewritten
    status = _status(vmm.ok("out"))
    assert status["metrics"]["staging_pages"] == 0
    assert status["metrics"]["swap_pages"] == data_pages
    model.verify()
    vmm.ok("disable")
    model.verify()


def test_device_writes_are_dirty(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    """A page written only through a device process's mapping is found written."""
    vmm, model = _cycle_one(make_vmm, swap_dir)
    pid = vmm.ok("fork_device", checks=[[0, 0, 3 * MIB, 1]],
                 writes=[[0, 1 * MIB, 128 * KIB, 5]])["pid"]
    assert vmm.ok("wait_device", pid=pid)["exit_code"] == 0
    for page in range(1 * MIB // PAGE_SIZE, (1 * MIB + 128 * KIB) // PAGE_SIZE):
        model.seeds[0][page] = 5
    # The device has exited: its writes can no longer be scanned, so nothing is trusted.
    status = _status(vmm.ok("status"))
    assert status["dirty_tracking"]["kept_pages"] == 0
    resident = status["metrics"]["resident_pages"]
    status = _status(vmm.ok("enable"))
    assert status["dirty_tracking"]["released_pages"] == 0
    assert status["metrics"]["staging_pages"] == resident
    model.verify()
    vmm.ok("out")
    vmm.ok("disable")
    model.verify()


def test_live_device_writes_are_dirty(make_vmm: Callable[..., TestVmm], swap_dir: Path,
                                      tmp_path: Path) -> None:
    """A device process that lives through the cycles is scanned at every enable: what it
    wrote between the cycles is copied, what nobody wrote is released."""
    vmm = make_vmm()
    vmm.launch(swap_dir, dirty_tracking=True)
    model = Model(vmm)
    model.write(0, 0, 3 * MIB, seed=1)
    go, linger = tmp_path / "go", tmp_path / "exit"
    pid = vmm.ok("fork_device", checks=[[0, 0, 3 * MIB, 1]],
                 writes=[[0, 1 * MIB, 128 * KIB, 5]], wait_path=str(go),
                 linger_path=str(linger))["pid"]
    # Registered before the first enable, so that it is scanned from then on.
    _wait_for(lambda: _status(vmm.ok("status"))["devices"] == 1,
              "the device never registered")
    vmm.ok("enable")
    vmm.ok("out")
    vmm.ok("disable")
    data_pages = model.written_pages()
    assert _status(vmm.ok("status"))["dirty_tracking"]["kept_pages"] == data_pages
    go.touch()  # the device checks every page, then writes 128 KiB
    _wait_for((tmp_path / "exit.ready").exists, "the device never wrote")
    for page in range(1 * MIB // PAGE_SIZE, (1 * MIB + 128 * KIB) // PAGE_SIZE):
        model.seeds[0][page] = 5
    status = _status(vmm.ok("enable"))
    tracking = status["dirty_tracking"]
    assert tracking["dirty_pages"] == 128 * KIB // PAGE_SIZE
    assert tracking["released_pages"] == data_pages - 128 * KIB // PAGE_SIZE
    model.verify()
    linger.touch()
    assert vmm.ok("wait_device", pid=pid)["exit_code"] == 0
    vmm.ok("out")
    vmm.ok("disable")
    model.verify()


def test_drop_file_forgets_the_copies(make_vmm: Callable[..., TestVmm],
                                      swap_dir: Path) -> None:
    vmm, model = _cycle_one(make_vmm, swap_dir)
    status = _status(vmm.ok("disable", drop_file=True))
    assert status["dirty_tracking"]["kept_pages"] == 0
    resident = status["metrics"]["resident_pages"]
    status = _status(vmm.ok("enable"))
    assert status["dirty_tracking"]["released_pages"] == 0
    assert status["metrics"]["staging_pages"] == resident
    model.verify()


def test_keep_limit_cuts_the_file(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _cycle_one(make_vmm, swap_dir, keep_file_bytes=1 * MIB)
    status = _status(vmm.ok("status"))
    assert status["dirty_tracking"]["kept_pages"] == 1 * MIB // PAGE_SIZE
    status = _status(vmm.ok("enable"))
    assert status["dirty_tracking"]["released_pages"] == 1 * MIB // PAGE_SIZE
    model.verify()
    vmm.ok("out")
    vmm.ok("disable")
    model.verify()


def test_tracking_off_by_default(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm = make_vmm()
    vmm.launch(swap_dir)
    status = _status(vmm.ok("status"))
    assert status["dirty_tracking"]["mode"] == "off"
    assert status["dirty_tracking"]["reason"]


INJECT = {"VMMSWAP_TEST_HANDLER_FACTORY": "control_inject:factory", "INJECT_BASE": ""}


def test_negative_control_a_skipped_written_page_is_caught(
        make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    """The checks above can fail: a scan answer with one written page left out releases that
    page's stale file copy, and the content check after it sees the old data."""
    vmm = make_vmm(**INJECT, INJECT_SKIP_WRITTEN="1")
    vmm.launch(swap_dir, dirty_tracking=True)
    model = Model(vmm)
    model.write(0, 0, 1 * MIB, seed=1)
    vmm.ok("enable")
    vmm.ok("out")
    vmm.ok("disable")
    model.write(0, 0, 64 * KIB, seed=2)
    status = _status(vmm.ok("enable"))
    assert status["dirty_tracking"]["dirty_pages"] == 64 * KIB // PAGE_SIZE - 1
    got = vmm.ok("verify", region=0, offset=0, length=64 * KIB, seed=2)
    assert got["mismatched_pages"] == 1, got


def test_monitor_restart_forgets_the_kept_file(make_vmm: Callable[..., TestVmm],
                                               swap_dir: Path) -> None:
    """A successor knows no clean page: a kill in Ready drops the kept file (everything is in
    guest memory then), and the next enable copies every page as without tracking."""
    vmm, model = _cycle_one(make_vmm, swap_dir)
    assert _status(vmm.ok("status"))["dirty_tracking"]["kept_pages"] == model.written_pages()
    old = vmm.monitor_pid
    os.kill(old, signal.SIGKILL)
    _wait_for(lambda: vmm.ok("restarts")["monitor_pid"] != old, "no successor")
    status = _status(vmm.ok("status"))
    assert status["state"] == "Ready"
    assert status["dirty_tracking"]["kept_pages"] == 0
    model.write(0, 0, 64 * KIB, seed=3)
    model.verify()
    resident = _status(vmm.ok("status"))["metrics"]["resident_pages"]
    status = _status(vmm.ok("enable"))
    assert status["metrics"]["staging_pages"] == resident
    vmm.ok("out")
    vmm.ok("disable")
    model.verify()
    assert _status(vmm.ok("status"))["dirty_tracking"]["kept_pages"] > 0  # tracking goes on


def test_a_restart_in_ready_leaves_no_discard_mark_behind(make_vmm: Callable[..., TestVmm],
                                                           swap_dir: Path) -> None:
    """Ready with a kept file is registered; a successor taking over there unregisters, and
    the page state must say so: left saying "registered", every later discard keeps its mark
    for a REMOVE no monitor applies, the page is written again and staged by the next enable,
    and the recovery of a successor after that drops it (a zero page read; CI's torture seeds
    15 and 76). Fails without the successor mapping the page state while Ready."""
    vmm, model = _cycle_one(make_vmm, swap_dir)
    assert vmm.ok("discard_marks")["registered"]  # the kept file's registration
    old = vmm.monitor_pid
    os.kill(old, signal.SIGKILL)
    _wait_for(lambda: vmm.ok("restarts")["monitor_pid"] != old, "no successor")
    assert _status(vmm.ok("status"))["state"] == "Ready"
    marks = vmm.ok("discard_marks")
    assert not marks["registered"], marks
    vmm.ok("discard", region=0, offset=0, length=64 * KIB)
    marks = vmm.ok("discard_marks")
    assert marks["marked_pages"] == 0, marks  # an unregistered discard clears its own mark
    model.write(0, 0, 64 * KIB, seed=5)  # written again: resident, then staged by the enable
    assert _status(vmm.ok("enable"))["state"] == "Pending"
    old = vmm.ok("restarts")["monitor_pid"]
    os.kill(old, signal.SIGKILL)
    _wait_for(lambda: vmm.ok("restarts")["monitor_pid"] != old, "no second successor")
    model.verify()  # from staging, through the second successor's faults
    vmm.ok("disable")
    model.verify()


@pytest.mark.parametrize("tracking", [False, True])
def test_a_discard_made_just_before_a_registration_keeps_no_mark(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, tracking: bool) -> None:
    """A discard made while nothing is registered (no REMOVE), its thread stalled after the
    madvise returned and before it stored ``discard_made`` -- a Python thread waiting for
    the GIL there, milliseconds under load -- while another thread's read of the hole
    allocated a zero page: the fresh registration found a resident page whose madvise had
    "not returned" and kept the mark, the thread then left it (registered by now), the guest
    wrote the page, the next enable staged it, and a successor's recovery dropped it: a zero
    page read (the torture's seed 10798374, once in ~100 runs). A page that reads as zeros
    is settled: dropping its copy or serving it gives the same bytes. Fails without that."""
    vmm = make_vmm()
    vmm.launch(swap_dir, dirty_tracking=tracking)
    model = Model(vmm)
    model.write(0, 0, 256 * KIB, seed=1)
    vmm.ok("discard_stalled", region=0, offset=64 * KIB, length=8 * KIB)
    model.seeds[0][16:18] = [0, 0]  # the model's zeros (the pages are holes now)
    model.verify()  # the read allocates zero pages in the holes: resident again
    assert vmm.ok("discard_marks")["marked_pages"] == 2  # the stalled discard's
    assert _status(vmm.ok("enable"))["state"] == "Pending"  # the fresh registration
    vmm.ok("discard_resume")  # thawed: registered now, so it leaves its marks to a monitor
    marks = vmm.ok("discard_marks")
    assert marks["registered"] and marks["marked_pages"] == 0, marks
    model.write(0, 64 * KIB, 8 * KIB, seed=7)  # the guest writes the pages again
    assert _status(vmm.ok("enable"))["state"] == "Pending"  # and they are staged
    old = vmm.ok("restarts")["monitor_pid"]
    os.kill(old, signal.SIGKILL)
    _wait_for(lambda: vmm.ok("restarts")["monitor_pid"] != old, "no successor")
    model.verify()  # from staging, through the successor's faults
    vmm.ok("disable")
    model.verify()


def test_a_fresh_registration_counts_pages_reading_as_zeros_as_holding_nothing() -> None:
    """What forget_settled is told holds data, on real memfds across two regions (global
    pages in host-address order): a written page does; a hole, a hole read since (shmem
    allocates a zero page there) and a page written with zeros do not."""
    with GuestMemory.create([(0, 1 * MIB), (4 * MIB, 1 * MIB)], name="holding") as memory:
        reg = Registration()
        reg.regions = memory.specs()
        reg.memfds = memory.memfds()
        reg.page_sizes = [PAGE_SIZE] * 2
        second = 0 if memory.specs()[1].host_addr < memory.specs()[0].host_addr else 256
        page = 4 * MIB + 5 * PAGE_SIZE  # global page second + 5
        memory.write(page, b"\1" * PAGE_SIZE)
        memory.write(page + PAGE_SIZE, bytes(PAGE_SIZE))
        memory.read(page + 2 * PAGE_SIZE, PAGE_SIZE)
        memory.write(page + 4 * PAGE_SIZE - 1, b"\2")  # the last byte of page + 3
        assert memory.resident_bytes() == 4 * PAGE_SIZE
        got = reg._holding_data(second, second + 256)
        assert np.flatnonzero(got).tolist() == [5, 8]
        assert reg._holding_data(second + 6, second + 9).tolist() == [False, False, True]


def test_a_device_without_write_protection_is_served_and_trusted_for_nothing(
        make_vmm: Callable[..., TestVmm], swap_dir: Path, tmp_path: Path) -> None:
    """A device uffd made without the WP features is registered MISSING only: its faults are
    filled without write protection (a protected fill would be refused there), and since its
    writes cannot be seen, the next enable releases nothing."""
    vmm = make_vmm()
    vmm.launch(swap_dir, dirty_tracking=True)
    model = Model(vmm)
    model.write(0, 0, 2 * MIB, seed=1)
    vmm.ok("enable")
    vmm.ok("out")
    go, linger = tmp_path / "go", tmp_path / "exit"
    pid = vmm.ok("fork_device", checks=[[0, 0, 2 * MIB, 1]], writes=[], wait_path=str(go),
                 linger_path=str(linger), plain_uffd=True)["pid"]
    _wait_for(lambda: _status(vmm.ok("status"))["devices"] == 1,
              "the device never registered")
    go.touch()  # it reads every page: faults served through its uffd, from the swap file
    _wait_for((tmp_path / "exit.ready").exists, "the device never read its pages")
    vmm.ok("disable")
    status = _status(vmm.ok("enable"))
    assert status["dirty_tracking"]["released_pages"] == 0
    model.verify()
    linger.touch()
    assert vmm.ok("wait_device", pid=pid)["exit_code"] == 0
    vmm.ok("out")
    vmm.ok("disable")
    model.verify()


def test_without_the_kernels_support_it_is_todays_behaviour(make_vmm: Callable[..., TestVmm],
                                                           swap_dir: Path) -> None:
    """Asked for on a kernel that cannot (as its feature report says): the status says off and
    why, and every cycle copies and writes everything, as without tracking."""
    vmm = make_vmm(**INJECT, INJECT_NO_TRACKING="1")
    vmm.launch(swap_dir, dirty_tracking=True)
    model = Model(vmm)
    model.write(0, 0, 1 * MIB, seed=1)
    status = _status(vmm.ok("status"))
    assert status["dirty_tracking"]["mode"] == "off"
    assert "injected" in status["dirty_tracking"]["reason"]
    for _ in range(2):
        resident = _status(vmm.ok("status"))["metrics"]["resident_pages"]
        status = _status(vmm.ok("enable"))
        assert status["metrics"]["staging_pages"] == resident
        assert status["dirty_tracking"]["released_pages"] == 0
        status = _status(vmm.ok("out"))
        assert status["metrics"]["swap_pages"] == resident
        status = _status(vmm.ok("disable"))
        assert status["dirty_tracking"]["kept_pages"] == 0
        model.verify()
