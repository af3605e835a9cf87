"""The KVM variant of a torture scenario: the micro-VM's guest tortures its own memory.

Both vCPUs run the guest's TORTURE command (``vmmswap/vm/guest/workload.c``): seeded random
write / verify / balloon runs over pages each vCPU owns, each page's version kept in a table in
guest memory, so the guest decides and checks and every fault comes through KVM exactly as in
production. Between batches a vCPU also verifies a range the host filled before launch and both
vCPUs share read-only. The host only drives commands (:class:`~.commands.HostCommands`) while
the batches run; at the end it disables and has each vCPU check every page it owns.

The negative control (``corrupt``) discards a vCPU's pages behind the guest's back, as a monitor
that served zero pages would: the final check must report a zero qword where data was.
"""

from __future__ import annotations

import random
from typing import Any, Final

from vmmswap.control.controller import SwapController
from vmmswap.dataplane.guest_memory import Backing
from vmmswap.vm.guest_abi import Op, TortureFlag
from vmmswap.vm.micro import MicroVM
from vmmswap.vm.workload import TortureReport, Workload

from .actors import Failure
from .commands import TIMEOUT, HostCommands, S
from .scenario import Options

MIB: Final = 1 << 20
SYSTEM: Final = 2 * MIB  # the guest's system area at the start of region 0
TABLES: Final = SYSTEM  # one version table per vCPU (u32 per page), 64 KiB apart
TABLE_STRIDE: Final = 64 * 1024
SHARED: Final = SYSTEM + 256 * 1024  # read-only for the vCPUs, filled by the host at start
SHARED_SEED: Final = 0x5EED
OWN: Final = 3 * MIB  # where region 0's own pages begin


class KvmScenario(HostCommands):
    def __init__(self, seed: int, options: Options) -> None:
        super().__init__()
        self.seed = seed
        self.options = options
        self.rng = rng = random.Random(seed ^ 0x4B564D)  # not the host scenario's script
        self.size = rng.choice((16, 20, 24)) * MIB
        #: Huge pages when the runner made them available: THP, or 2 MiB hugetlbfs (then the
        #: guest does not balloon: its runs are 4 KiB pages, a discard must be whole 2 MiB).
        self.backing = (rng.choices((Backing.SMALL, Backing.THP, Backing.HUGETLB_2M),
                                    (3, 1, 1))[0] if options.huge_pages else Backing.SMALL)
        self.disk_full = options.small_swap_dir is not None and rng.random() < 0.1
        self.eio_at = rng.randint(1, 3) if not self.disk_full and rng.random() < 0.15 else 0
        self.ctl: SwapController | None = None
        self.vm: MicroVM | None = None
        self.ranges: list[tuple[int, int]] = []
        self.pending: list[Any] = []
        self.guest = {"guest_writes": 0, "guest_verifies": 0, "guest_balloons": 0,
                      "guest_pages_checked": 0}

    def _result(self, error: str | None) -> dict[str, Any]:
        if error is not None:
            error = f"SEED {self.seed} (kvm): {error}\nhost log: " + " | ".join(self.log[-15:])
        return {"seed": self.seed, "kind": "kvm", "backing": self.backing.value,
                "ok": error is None, "error": error, **self.stats.__dict__, **self.guest}

    def _run(self) -> None:
        vm = self.vm = MicroVM(self.size, vcpus=2, regions=2, backing=self.backing)
        self.note(f"{self.size // MIB} MiB on {self.backing.value} pages")
        self.stats.huge_backed = int(self.backing is not Backing.SMALL)
        (_, low), (high_addr, high) = vm.layout.regions
        # Each vCPU owns the rest of one region; which one is the seed's choice.
        own = [(OWN, low - OWN), (high_addr, high)]
        self.rng.shuffle(own)
        self.ranges = own
        w = vm.workload
        readahead = self.rng.random() < 0.8
        self.launch(vm.memory, readahead)
        vm.start()
        w.timeout = TIMEOUT
        shared_len = OWN - SHARED
        shared_off = SHARED - SYSTEM  # data offsets start after the system area
        w.fill(shared_off, shared_len, SHARED_SEED, vcpus=0)
        self.pending = [self._next_batch(w, vcpu) for vcpu in range(2)]
        if self.options.corrupt:  # vCPU 0 surely writes pages before they are dropped
            self.pending[0] = ("torture", w.torture_submit(
                0, *self.ranges[0], TABLES, self.seed, 2000))
        for _ in range(self.rng.randint(5, 12)):
            self._collect(w, wait=False)
            self.host_command()
        self.finish(w)

    def _next_batch(self, w: Workload, vcpu: int) -> tuple[str, Any]:
        start, length = self.ranges[vcpu]
        if self.rng.random() < 0.15:  # the shared range, read-only for both
            return "verify", w.device.submit(vcpu, Op.VERIFY, [SHARED, OWN - SHARED,
                                                                SHARED_SEED])
        balloon = vcpu == 0 and self.backing is not Backing.HUGETLB_2M
        flags = TortureFlag.BALLOON if balloon and self.rng.random() < 0.7 else TortureFlag(0)
        ops = self.rng.choice((50, 200, 800, 2000))
        return "torture", w.torture_submit(vcpu, start, length, TABLES + vcpu * TABLE_STRIDE,
                                           self.rng.randrange(1 << 62), ops, flags)

    def _collect(self, w: Workload, *, wait: bool) -> None:
        """Check every finished batch and give its vCPU the next one (unless ``wait``: then
        wait for both and give none)."""
        for vcpu, (kind, pending) in enumerate(self.pending):
            if not wait and not pending.done.is_set():
                continue
            if kind == "verify":
                report = w.collect(pending)
                self.guest["guest_pages_checked"] += report.pages
                if report.mismatches:
                    raise Failure(f"vCPU {vcpu}: the shared read-only range has "
                                  f"{report.mismatches} wrong qwords, the first at "
                                  f"{report.first_bad:#x}")
            else:
                self._check(vcpu, w.torture_result(pending))
            if not wait:
                self.pending[vcpu] = self._next_batch(w, vcpu)

    def _check(self, vcpu: int, report: TortureReport) -> None:
        self.guest["guest_writes"] += report.writes
        self.guest["guest_verifies"] += report.verifies
        self.guest["guest_balloons"] += report.balloons
        self.guest["guest_pages_checked"] += report.pages_checked
        if report.bad_qwords:
            raise Failure(f"vCPU {vcpu} (owns {self.ranges[vcpu][0]:#x}+"
                          f"{self.ranges[vcpu][1]:#x}): {report.describe()}")

    def _corrupt(self) -> None:
        """Negative control: drop vCPU 0's pages behind the guest's back (a zero page where
        data was); once memory is back the guest's final check must see it."""
        assert self.vm is not None
        start, length = self.ranges[0]
        if self.backing is Backing.HUGETLB_2M:  # whole huge pages only
            end = (start + length) & ~(2 * MIB - 1)
            start = -(-start // (2 * MIB)) * 2 * MIB
            length = end - start
        self.note("CORRUPT: discard vCPU 0's pages behind the guest's back")
        self.vm.memory.discard(start, length)

    def finish(self, w: Workload) -> None:
        self._collect(w, wait=True)
        if self.options.corrupt:
            self._corrupt()
        status = self.controller().disable(slow_file_cleanup=self.rng.random() < 0.5,
                                           wait=True, timeout=TIMEOUT)
        self.note(f"final disable -> {status.state}")
        if status.state is not S.READY:
            raise Failure(f"not Ready after the final disable: {status}")
        finals = [w.torture_submit(v, *self.ranges[v], TABLES + v * TABLE_STRIDE, 0, 0,
                                   TortureFlag.CHECK_ALL) for v in range(2)]
        for vcpu, pending in enumerate(finals):
            report = w.torture_result(pending)
            self._check(vcpu, report)
            if report.pages_checked != self.ranges[vcpu][1] // 4096:
                raise Failure(f"vCPU {vcpu} checked {report.pages_checked} pages of "
                              f"{self.ranges[vcpu][1] // 4096}")
        shared = w.verify(SHARED - SYSTEM, OWN - SHARED, SHARED_SEED, vcpus=1)
        if shared.mismatches:
            raise Failure(f"after the final disable the shared range has {shared.mismatches} "
                          f"wrong qwords, the first at {shared.first_bad:#x}")

    def _teardown(self, error: str | None) -> str | None:
        vm, ctl = self.vm, self.ctl
        stuck = False
        if vm is not None:
            try:
                vm.shutdown(timeout=10)
            except Exception as err:  # a vCPU blocked on a fault nobody serves
                stuck = True
                error = error or f"shutdown: {type(err).__name__}: {err}"
        if ctl is not None and not stuck:
            try:
                ctl.close()
            except Exception as err:
                error = error or f"close: {type(err).__name__}: {err}"
        if vm is not None and not stuck:
            vm.close()
        if stuck:
            error = (error or "") + "\nSTUCK: a vCPU is blocked; the VMM process must go"
        return error
