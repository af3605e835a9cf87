"""End-to-end vmm-swap scenarios on the micro-VM, one per process.

These are crosvm's e2e swap tests replayed on a KVM guest, plus two that need a real guest: two
vCPUs faulting the same pages at once, and a balloon return while swap is Active. Each scenario
runs the VMM (this process) with its memory under vmm-swap and returns observations -- the states
seen, the guest's checksums and pattern checks, the metrics -- as a JSON-able dict; the tests in
``tests/vm`` run ``python -m vmmswap.vm.scenarios NAME`` in a child process with a timeout and
assert on that output. A child process, because a bug that blocks a fault must fail a test, not
hang the test runner.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from vmmswap.dataplane.guest_memory import Backing
from vmmswap.dataplane.huge_pages import pmd_mapped_bytes
from vmmswap.vm.hugetlb_pool import HugetlbPool, ShmemThpMode
from vmmswap.vm.micro import MicroVM
from vmmswap.vm.swap_session import launch_controller, metrics_dict, state_name, wait_for_state
from vmmswap.vm.workload import Workload

MIB = 1 << 20
CHUNK = 2 * MIB
FILL = 32 * MIB
ZERO = 4 * MIB
TIMEOUT = 120.0


class Run:
    """A small guest under vmm-swap with its data filled and checksummed."""

    def __init__(self, swap_dir: str, *, memory: int = 96 * MIB, vcpus: int = 2,
                 readahead: bool = True, backing: Backing = Backing.SMALL) -> None:
        self.vm = MicroVM(memory, vcpus=vcpus, regions=2, backing=backing)
        self.ctl = launch_controller(self.vm.memory, swap_dir, readahead=readahead)
        self.ctl_closed = False
        self.states: list[str] = []
        self.vm.start()
        self.w: Workload = self.vm.workload
        self.w.timeout = TIMEOUT  # a fault nobody serves fails the scenario, never hangs it
        self.w.fill(0, FILL - ZERO, seed=1)
        self.w.fill(FILL - ZERO, ZERO, seed=0)
        self.baseline = self.w.checksum(0, FILL, CHUNK).checksums
        self.note()

    def note(self, status: Any = None) -> Any:
        status = status if status is not None else self.ctl.status()
        name = state_name(status)
        if not self.states or self.states[-1] != name:
            self.states.append(name)
        return status

    def wait(self, *targets: str) -> Any:
        seen: list[str] = []
        status = wait_for_state(self.ctl.status, set(targets), timeout=TIMEOUT, seen=seen)
        for name in seen:
            self.note_name(name)
        return status

    def note_name(self, name: str) -> None:
        if not self.states or self.states[-1] != name:
            self.states.append(name)

    def enable(self) -> Any:
        self.ctl.enable()
        return self.note()

    def trim(self) -> Any:
        self.ctl.trim()
        return self.wait("Pending")

    def out(self) -> Any:
        self.ctl.swap_out()
        return self.wait("Active")

    def disable(self) -> Any:
        self.ctl.disable()
        return self.wait("Ready")

    def checksums_ok(self, offset: int = 0, length: int = FILL) -> bool:
        sums = self.w.checksum(offset, length, CHUNK).checksums
        first = offset // CHUNK
        return sums == self.baseline[first:first + len(sums)]

    def pattern_ok(self) -> bool:
        return (self.w.verify(0, FILL - ZERO, 1).mismatches == 0
                and self.w.verify(FILL - ZERO, ZERO, 0).mismatches == 0)

    def metrics(self) -> dict[str, int]:
        return metrics_dict(self.note())

    def close_controller(self) -> None:
        """Swap everything back in and stop the monitor (idempotent)."""
        if not self.ctl_closed:
            self.ctl_closed = True
            self.ctl.close()

    def close(self) -> None:
        try:
            if self.vm.machine.running:
                self.vm.shutdown()
        finally:
            self.close_controller()
            self.vm.close()


def states_sequence(run: Run) -> dict[str, Any]:
    """Ready -> Pending -> (trim) Pending -> Active -> Ready, contents checked at each step."""
    out: dict[str, Any] = {}
    run.enable()
    out["enabled_first_half"] = run.checksums_ok(0, FILL // 2)
    trim = run.trim()
    out["trim_pages"] = int(trim.state_transition.pages)
    out["trimmed_zero_range"] = out["trim_pages"] >= ZERO // 4096
    run.out()
    out["active_second_half"] = run.checksums_ok(FILL // 2, FILL // 2)
    out["metrics_active"] = run.metrics()
    run.disable()
    out["after_disable"] = run.checksums_ok() and run.pattern_ok()
    return out


def out_several_times(run: Run) -> dict[str, Any]:
    """enable/out three times with guest activity in between; contents survive each round."""
    out: dict[str, Any] = {"rounds": []}
    for round_ in range(3):
        run.enable()
        run.out()
        offset = round_ * 8 * MIB
        out["rounds"].append(run.checksums_ok(offset, 8 * MIB))
    run.disable()
    out["after_disable"] = run.checksums_ok() and run.pattern_ok()
    return out


def disable_without_out(run: Run) -> dict[str, Any]:
    """enable then disable straight away: everything comes back from staging."""
    status = run.enable()
    out: dict[str, Any] = {"pending": state_name(status)}
    run.disable()
    out["after_disable"] = run.checksums_ok() and run.pattern_ok()
    return out


def stop_while_active(run: Run) -> dict[str, Any]:
    """The VM stops while swap is Active; closing the controller must still end cleanly."""
    run.enable()
    run.out()
    run.vm.shutdown()
    out: dict[str, Any] = {"vm_stopped": not run.vm.machine.running}
    monitor = run.ctl.monitor_pid
    run.close_controller()
    out["controller_closed"] = True
    out["monitor_exited"] = not run.ctl.monitor_alive()
    try:  # close() reaps the monitor: a pid that still exists would be a leak
        os.kill(monitor, 0)
        out["monitor_pid_gone"] = False
    except ProcessLookupError:
        out["monitor_pid_gone"] = True
    return out


def two_vcpus_same_pages(run: Run) -> dict[str, Any]:
    """Both vCPUs read the same swapped-out range at the same time."""
    run.enable()
    run.out()
    report = run.w.read(0, 16 * MIB, vcpus=[0, 1], replicate=True)
    out: dict[str, Any] = {"pages_read": report.pages}
    out["metrics"] = run.metrics()
    out["contents"] = run.checksums_ok(0, 16 * MIB)
    run.disable()
    out["after_disable"] = run.checksums_ok() and run.pattern_ok()
    return out


def balloon_while_active(run: Run) -> dict[str, Any]:
    """The guest returns a swapped-out range while Active: REMOVE events, then zeros."""
    run.enable()
    run.out()
    before = run.metrics()
    run.w.balloon(8 * MIB, 8 * MIB)
    out: dict[str, Any] = {"swap_pages_before": before.get("swap_pages")}
    after = run.metrics()
    out["swap_pages_after"] = after.get("swap_pages")
    out["ballooned_zero"] = run.w.verify(8 * MIB, 8 * MIB, 0).mismatches == 0
    out["rest_intact"] = (run.checksums_ok(0, 8 * MIB) and run.checksums_ok(16 * MIB, 16 * MIB))
    run.disable()
    out["after_disable_zero"] = run.w.verify(8 * MIB, 8 * MIB, 0).mismatches == 0
    out["after_disable_rest"] = run.checksums_ok(0, 8 * MIB) and run.checksums_ok(
        16 * MIB, 16 * MIB)
    return out


def _pmd_mapped(run: Run) -> int:
    return sum(pmd_mapped_bytes(os.getpid(), r.host_addr, r.host_addr + r.size)
               for r in run.vm.memory.regions)


def huge_pages_after_disable(run: Run) -> dict[str, Any]:
    """THP guest memory: PMD-mapped before enable, and again (collapsed by the monitor) after
    a whole cycle whose fills brought every page back as a small page."""
    out: dict[str, Any] = {"pmd_before": _pmd_mapped(run)}
    run.enable()
    run.trim()
    run.out()
    out["retouched_ok"] = run.checksums_ok(0, 8 * MIB)
    run.disable()
    # The monitor collapses on a helper thread after disable: wait until the count stops
    # growing (1 s without change once non-zero), or reaches what it was.
    deadline = time.monotonic() + 30.0
    after, changed = _pmd_mapped(run), time.monotonic()
    while after < out["pmd_before"] and time.monotonic() < deadline:
        if after and time.monotonic() - changed > 1.0:
            break
        time.sleep(0.05)
        now = _pmd_mapped(run)
        if now != after:
            after, changed = now, time.monotonic()
    out["pmd_after"] = after
    out["after_disable"] = run.pattern_ok() and run.checksums_ok()
    return out


SCENARIOS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "states": states_sequence,
    "out-several-times": out_several_times,
    "disable-without-out": disable_without_out,
    "stop-while-active": stop_while_active,
    "two-vcpus-same-pages": two_vcpus_same_pages,
    "balloon-while-active": balloon_while_active,
    "huge-pages-after-disable": huge_pages_after_disable,
}


def run_scenario(name: str, swap_dir: str, backing: Backing = Backing.SMALL) -> dict[str, Any]:
    """Run one scenario; on hugetlbfs the kernel's pool is grown for it and restored after."""
    memory = 96 * MIB
    with contextlib.ExitStack() as stack:
        if backing is Backing.HUGETLB_2M:
            stack.enter_context(HugetlbPool(memory // backing.page_size))
        if backing is Backing.THP:
            stack.enter_context(ShmemThpMode("advise"))
        run = Run(swap_dir, memory=memory, backing=backing)
        try:
            result = SCENARIOS[name](run)
        finally:
            run.close()
    result["states"] = run.states
    result["page_size"] = backing.page_size
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmmswap.vm.scenarios")
    parser.add_argument("name", choices=sorted(SCENARIOS))
    parser.add_argument("--swap-dir", default=None)
    parser.add_argument("--hugepages", choices=("2M", "thp"), default=None,
                        help="back guest memory with 2 MiB hugetlbfs pages, or shmem THP "
                             "(shmem_enabled set to advise for the run)")
    parser.add_argument("--hang-dump", type=float, default=None, metavar="SECONDS",
                        help="print every thread's stack to stderr if still running then")
    args = parser.parse_args(argv)
    if args.hang_dump:
        faulthandler.dump_traceback_later(args.hang_dump, exit=False)
    with tempfile.TemporaryDirectory(dir=args.swap_dir) as swap_dir:
        backing = {"2M": Backing.HUGETLB_2M, "thp": Backing.THP}.get(args.hugepages or "",
                                                                      Backing.SMALL)
        result = run_scenario(args.name, swap_dir, backing)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
