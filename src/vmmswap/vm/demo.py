"""``vmmswap demo``: vmm-swap on a real (micro) virtual machine, end to end, in one command.

It boots the built-in guest under KVM, lets it fill memory with a deterministic pattern (and a
zero range, so trim has zero pages to drop), then runs the crosvm sequence while the guest keeps
working: enable, the guest touches a hot set (served from staging), trim, out, the guest re-touches
part of its memory (served from the swap file and zero pages, timed by the guest with the TSC),
status, disable -- and finally the guest checksums and verifies every page it wrote. The exit
status is 0 only when every checksum and every pattern check passes.

The VMM here is this process: its Python code talks to the guest through port I/O only and never
reads guest memory while swap is enabled.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from vmmswap.dataplane.guest_memory import Backing
from vmmswap.vm import guest_abi as abi
from vmmswap.vm.guest_build import GuestBuildError, build_guest
from vmmswap.vm.hugetlb_pool import HugetlbPool
from vmmswap.vm.kvm import DEFAULT_KVM_PATH, Kvm, KvmUnavailableError, kvm_flavour
from vmmswap.vm.micro import MicroVM
from vmmswap.vm.swap_session import (
    Phase,
    PhaseClock,
    SwapUnavailableError,
    launch_controller,
    metrics_dict,
    state_name,
    status_transition_pages,
    wait_for_state,
)
from vmmswap.vm.workload import OpReport

MIB = 1 << 20
CHUNK = 2 * MIB


@dataclass
class DemoPlan:
    """Which data ranges (linear data offsets) the demo fills, touches and checks."""

    fill: int
    zero: int  # the last `zero` bytes of the filled range hold zeros
    hot: int  # touched between enable and trim: faults served from staging
    retouch: int  # touched after out: faults served from the file (and zero pages)
    rewrite: int  # rewritten after out, with a second seed
    #: Rewritten between cycles (seed 3 + cycle), right after ``rewrite``: about a tenth.
    cycle_rewrite: int = 0

    @classmethod
    def for_fill(cls, fill: int, retouch: int | None = None) -> DemoPlan:
        def chunks(n: int) -> int:
            return max(CHUNK, n // CHUNK * CHUNK)

        fill = chunks(fill)
        zero = chunks(fill // 8)
        hot = chunks(fill // 16)
        rewrite = chunks(fill // 32)
        retouch = chunks(retouch if retouch is not None else fill // 4)
        cycle_rewrite = chunks(fill // 10)
        if retouch > fill - hot or hot + rewrite + cycle_rewrite + zero > fill:
            raise ValueError(f"fill of {fill // MIB} MiB is too small for this plan")
        return cls(fill=fill, zero=zero, hot=hot, retouch=retouch, rewrite=rewrite,
                   cycle_rewrite=cycle_rewrite)

    @property
    def pattern_end(self) -> int:
        return self.fill - self.zero

    @property
    def retouch_start(self) -> int:
        """The re-touched range ends with the zero range, so zero pages are faulted too."""
        return self.fill - self.retouch

    @property
    def rewrite_start(self) -> int:
        return self.hot

    @property
    def cycle_rewrite_start(self) -> int:
        return self.hot + self.rewrite


@dataclass
class DemoResult:
    """Every figure the demo reports (also its ``--json`` output)."""

    memory_mib: int
    vcpus: int
    regions: int
    fill_mib: int
    readahead: bool
    #: Bytes per page of the swap counters: the guest's page (2 MiB with --hugepages 2M).
    page_size: int = 4096
    swap: str = "unavailable"
    states: list[str] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    pages_moved: int | None = None
    pages_trimmed: int | None = None
    pages_written: int | None = None
    pages_swapped_in: int | None = None
    metrics: dict[str, int] = field(default_factory=dict)
    retouch_pages: int = 0
    retouch_p50_us: float | None = None
    retouch_p99_us: float | None = None
    retouch_max_bucket_us: float | None = None
    retouch_seconds: float | None = None
    hot_p50_us: float | None = None
    #: "wp-async" when dirty tracking ran, else "off" (and why).
    dirty_tracking: str = "off"
    #: One entry per swap cycle: pages moved / released without a copy / written, and the
    #: enable's time and VM-frozen time.
    cycles: list[dict[str, Any]] = field(default_factory=list)
    checksum_chunks: int = 0
    checksum_mismatches: int = 0
    pattern_mismatches: int = 0
    verdict: str = "FAIL"
    error: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vmmswap demo",
        description="Boot the built-in KVM guest and put its memory through vmm-swap: "
                    "enable, trim, out, re-touch, status, disable, verify.")
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB",
                        help="guest RAM in MiB (default 1024)")
    parser.add_argument("--vcpus", type=int, default=2, help="vCPUs (default 2)")
    parser.add_argument("--regions", type=int, choices=(1, 2), default=2,
                        help="guest memory regions: 2 puts half above 4 GiB (default 2)")
    parser.add_argument("--fill", type=int, default=384, metavar="MIB",
                        help="MiB of guest memory the guest fills (default 384)")
    parser.add_argument("--retouch", type=int, default=None, metavar="MIB",
                        help="MiB the guest re-touches after out (default a quarter of --fill)")
    parser.add_argument("--swap-dir", default=None,
                        help="directory for the (unnamed) swap file (default: the temp dir)")
    parser.add_argument("--no-readahead", action="store_true",
                        help="serve faults from the swap file one page at a time")
    parser.add_argument("--hugepages", choices=("2M",), default=None,
                        help="back guest memory with 2 MiB hugetlbfs pages (as root, the "
                             "kernel's pool is grown for the run and restored afterwards)")
    parser.add_argument("--kvm-device", default=DEFAULT_KVM_PATH, help=argparse.SUPPRESS)
    parser.add_argument("--cycles", type=int, default=1, choices=range(1, 6), metavar="N",
                        help="swap cycles (enable .. disable); from the second on, the guest "
                        "first rewrites a tenth of its data (default 1)")
    parser.add_argument("--no-dirty-tracking", action="store_true",
                        help="copy every page at every enable (no WP_ASYNC dirty tracking)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for any one swap state (default 300)")
    return parser.parse_args(argv)


class Demo:
    """One run: owns the VM and the controller, collects a DemoResult."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.args = args
        self.out = out
        self.plan = DemoPlan.for_fill(args.fill * MIB,
                                      None if args.retouch is None else args.retouch * MIB)
        self.backing = Backing.HUGETLB_2M if args.hugepages == "2M" else Backing.SMALL
        self.result = DemoResult(memory_mib=args.memory, vcpus=args.vcpus, regions=args.regions,
                                 fill_mib=self.plan.fill // MIB,
                                 readahead=not args.no_readahead,
                                 page_size=self.backing.page_size)
        self.pool: HugetlbPool | None = None
        self.clock = PhaseClock(self._progress)
        self.vm: MicroVM | None = None
        self.kvm: Kvm | None = None
        self.ctl: Any = None
        self.baseline: list[int] = []
        #: The seed of the range rewritten between cycles (1: not rewritten).
        self.cycle_seed = 1

    # --- output -----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _progress(self, phase: Phase) -> None:
        self.result.phases.append({"phase": phase.name, "seconds": round(phase.seconds, 3),
                                   "detail": phase.detail})
        self.say(f"  {phase.name:<10} {phase.seconds:8.2f} s  {phase.detail}")

    # --- steps --------------------------------------------------------------------------------
    def boot(self) -> str:
        args = self.args
        self.kvm = Kvm(args.kvm_device)
        program = build_guest()
        if self.backing is Backing.HUGETLB_2M:
            self.pool = HugetlbPool(args.memory * MIB // self.backing.page_size)
        self.vm = MicroVM(args.memory * MIB, vcpus=args.vcpus, regions=args.regions,
                          program=program, kvm=self.kvm, backing=self.backing)
        if self.plan.fill > self.vm.layout.data_size:
            raise ValueError(f"--fill {self.plan.fill // MIB} MiB exceeds the guest's "
                             f"{self.vm.layout.data_size // MIB} MiB data area")
        swap_dir = args.swap_dir or tempfile.gettempdir()
        try:
            self.ctl = launch_controller(self.vm.memory, swap_dir,
                                         readahead=not args.no_readahead,
                                         dirty_tracking=not args.no_dirty_tracking)
            self.result.swap = "available"
            self._seen(self.ctl.status())
        except SwapUnavailableError as exc:
            self.result.swap = f"unavailable: {exc}"
        self.vm.start()
        regions = ", ".join(f"{a:#x}+{s // MIB}M" for a, s in self.vm.layout.regions)
        pages = (f", {self.vm.memory.page_size // MIB} MiB hugetlbfs pages"
                 if self.backing is Backing.HUGETLB_2M else "")
        return (f"{args.memory} MiB in [{regions}]{pages}, {args.vcpus} vCPUs, "
                f"{kvm_flavour()}, TSC {self.vm.tsc_khz} kHz")

    def fill(self) -> str:
        assert self.vm is not None
        w, plan = self.vm.workload, self.plan
        w.fill(0, plan.pattern_end, seed=1)
        w.fill(plan.pattern_end, plan.zero, seed=0)
        self.baseline = w.checksum(0, plan.fill, CHUNK).checksums
        return (f"{plan.pattern_end // MIB} MiB pattern + {plan.zero // MIB} MiB zeros, "
                f"{len(self.baseline)} checksums")

    def enable(self) -> str:
        start = time.monotonic()
        status = self.ctl.enable()
        seconds = time.monotonic() - start
        moved = status_transition_pages(self.ctl.status())
        tracking = status.dirty_tracking
        self.result.dirty_tracking = tracking.mode + (f" ({tracking.reason})"
                                                      if tracking.reason else "")
        self.result.cycles.append({"cycle": len(self.result.cycles) + 1, "pages_moved": moved,
                                   "pages_released": tracking.released_pages,
                                   "pages_dirty": tracking.dirty_pages,
                                   "enable_seconds": round(seconds, 4),
                                   "frozen_seconds": status.frozen_seconds})
        if self.result.pages_moved is None:
            self.result.pages_moved = moved
        self._seen(status)
        released = (f", {tracking.released_pages} released without a copy"
                    if len(self.result.cycles) > 1 else "")
        return (f"{moved} pages moved to staging{released}; VM frozen "
                f"{status.frozen_seconds * 1000:.1f} ms")

    def hot(self) -> OpReport:
        assert self.vm is not None
        report = self.vm.workload.read(0, self.plan.hot)
        if report.latency is not None:
            self.result.hot_p50_us = report.latency.percentile_us(50)
        return report

    def trim(self) -> str:
        self.ctl.trim()
        status = self._wait({"Pending"})
        self.result.pages_trimmed = status_transition_pages(status)
        return f"{self.result.pages_trimmed} pages trimmed (zero or unchanged)"

    def swap_out(self) -> str:
        self.ctl.swap_out()
        status = self._wait({"Active"})
        written = status_transition_pages(status)
        if self.result.pages_written is None:
            self.result.pages_written = written
        self.result.cycles[-1]["pages_written"] = written
        return f"{written} pages written to the swap file"

    def rewrite_between_cycles(self) -> str:
        assert self.vm is not None
        plan = self.plan
        seed = 2 + len(self.result.cycles)
        self.vm.workload.fill(plan.cycle_rewrite_start, plan.cycle_rewrite, seed=seed)
        self.cycle_seed = seed
        return f"{plan.cycle_rewrite // MIB} MiB rewritten by the guest (seed {seed})"

    def retouch(self) -> OpReport:
        assert self.vm is not None
        plan = self.plan
        report = self.vm.workload.read(plan.retouch_start, plan.retouch)
        self.vm.workload.fill(plan.rewrite_start, plan.rewrite, seed=2)
        lat = report.latency
        if lat is not None:
            self.result.retouch_pages = report.pages
            self.result.retouch_p50_us = lat.percentile_us(50)
            self.result.retouch_p99_us = lat.percentile_us(99)
            self.result.retouch_max_bucket_us = lat.percentile_us(100)
            self.result.retouch_seconds = report.guest_s
        return report

    def status(self) -> str:
        status = self.ctl.status()
        self._seen(status)
        self.result.metrics = metrics_dict(status)
        return f"state {state_name(status)}"

    def disable(self) -> str:
        self.ctl.disable()
        status = self._wait({"Ready"})
        self.result.pages_swapped_in = status_transition_pages(status)
        return f"{self.result.pages_swapped_in} pages swapped in"

    def verify(self) -> str:
        assert self.vm is not None
        w, plan = self.vm.workload, self.plan
        sums = w.checksum(0, plan.fill, CHUNK).checksums
        expected = list(self.baseline)
        # Rewritten chunks hold another seed now: their expected sums come from the host model.
        for start, length, seed in self.model():
            if seed < 2:
                continue
            for offset in range(start, start + length, CHUNK):
                addr = self.vm.layout.span(offset, CHUNK)[0][0]
                expected[offset // CHUNK] = abi.checksum(addr, abi.pattern(addr, CHUNK, seed))
        bad_sums = sum(1 for a, b in zip(sums, expected, strict=True) if a != b)
        bad = 0
        for offset, length, seed in self.model():
            bad += w.verify(offset, length, seed).mismatches
        self.result.checksum_chunks = len(sums)
        self.result.checksum_mismatches = bad_sums
        self.result.pattern_mismatches = bad
        ok = bad_sums == 0 and bad == 0 and len(sums) == len(expected)
        self.result.verdict = "PASS" if ok else "FAIL"
        return (f"{len(sums) - bad_sums}/{len(sums)} checksums match, "
                f"{bad} wrong qwords: {self.result.verdict}")

    def model(self) -> list[tuple[int, int, int]]:
        """``(offset, length, seed)`` of everything the guest should hold now."""
        plan = self.plan
        cycle_end = plan.cycle_rewrite_start + plan.cycle_rewrite
        return [(0, plan.rewrite_start, 1), (plan.rewrite_start, plan.rewrite, 2),
                (plan.cycle_rewrite_start, plan.cycle_rewrite, self.cycle_seed),
                (cycle_end, plan.pattern_end - cycle_end, 1), (plan.pattern_end, plan.zero, 0)]

    def _seen(self, status: Any) -> None:
        name = state_name(status)
        if not self.result.states or self.result.states[-1] != name:
            self.result.states.append(name)

    def _wait(self, targets: set[str]) -> Any:
        # trim, out and disable are asynchronous; the controller's socket keeps commands in
        # order, so the first status after one already reflects it.
        seen: list[str] = []
        status = wait_for_state(self.ctl.status, targets, timeout=self.args.timeout, seen=seen)
        for name in seen:
            if not self.result.states or self.result.states[-1] != name:
                self.result.states.append(name)
        return status

    # --- the whole run ------------------------------------------------------------------------
    def run(self) -> DemoResult:
        args, plan = self.args, self.plan
        pages = "2 MiB hugetlbfs" if self.backing is Backing.HUGETLB_2M else "4 KiB"
        self.say(f"vmmswap demo: {args.memory} MiB guest on {pages} pages, {args.vcpus} vCPUs, "
                 f"{args.regions} region(s); fill {plan.fill // MIB} MiB, re-touch "
                 f"{plan.retouch // MIB} MiB; readahead {'off' if args.no_readahead else 'on'}")
        try:
            c = self.clock
            c.run("boot", self.boot, str)
            c.run("fill", self.fill, str)
            swap = self.ctl is not None
            if not swap:
                self.say(f"  swap       {self.result.swap}")
                self.say("  (enable, trim, out, status and disable are skipped)")
            if swap:
                c.run("enable", self.enable, str)
            c.run("hot set", self.hot, lambda r: _touch_detail(r, "touched"))
            if swap:
                c.run("trim", self.trim, str)
                c.run("out", self.swap_out, str)
            c.run("re-touch", self.retouch, lambda r: _touch_detail(r, "re-touched"))
            if swap:
                c.run("status", self.status, str)
                c.run("disable", self.disable, str)
                for _ in range(2, args.cycles + 1):
                    c.run("rewrite", self.rewrite_between_cycles, str)
                    c.run("enable", self.enable, str)
                    c.run("trim", self.trim, str)
                    c.run("out", self.swap_out, str)
                    c.run("disable", self.disable, str)
            c.run("verify", self.verify, str)
            if self.ctl is None:
                self.result.verdict = "FAIL"
                self.result.error = "vmm-swap was not exercised (controller " + \
                    self.result.swap + ")"
            assert self.vm is not None
            c.run("shutdown", lambda: self.vm.shutdown() if self.vm else None,
                  lambda _: "guest halted")
        except (KvmUnavailableError, GuestBuildError):
            raise
        except (OSError, RuntimeError, ValueError, TimeoutError) as exc:
            self.result.error = f"{type(exc).__name__}: {exc}"
            self.result.verdict = "FAIL"
        finally:
            self.close()
        return self.result

    def close(self) -> None:
        if self.ctl is not None:
            try:
                self.ctl.close()
            except (OSError, RuntimeError) as exc:
                self.result.error = self.result.error or f"closing swap: {exc}"
                self.result.verdict = "FAIL"
            self.ctl = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
        if self.pool is not None:
            self.pool.close()  # after the guest memory is gone: its pages are free again
            self.pool = None


def _touch_detail(report: OpReport, where: str) -> str:
    lat = report.latency
    if lat is None or report.pages == 0:
        return ""
    return (f"{report.pages} pages {where}: guest p50 {lat.percentile_us(50):.1f} us, "
            f"p99 {lat.percentile_us(99):.1f} us")


def format_table(result: DemoResult) -> str:
    """The final table of figures."""
    m = result.metrics

    def fig(value: float | int | None, unit: str = "", fmt: str = "{:,}") -> str:
        if value is None:
            return "n/a"
        return fmt.format(value) + (f" {unit}" if unit else "")

    rows: list[tuple[str, str]] = [
        ("swap controller", result.swap),
        ("page size (pages below)", f"{result.page_size // 1024} KiB"),
        ("states seen", " -> ".join(result.states) or "n/a"),
        ("pages moved to staging (enable)", fig(result.pages_moved)),
        ("pages trimmed", fig(result.pages_trimmed)),
        ("pages written to swap file (out)", fig(result.pages_written)),
        ("faults served from staging", fig(m.get("copied_from_staging_pages"))),
        ("faults served from swap file", fig(m.get("copied_from_file_pages"))),
        ("faults served with zero pages", fig(m.get("zeroed_pages"))),
        ("redundant faults", fig(m.get("redundant_pages"))),
        ("readahead pages", fig(m.get("readahead_pages"))),
        ("faults avoided by readahead", fig(m.get("faults_avoided"))),
        ("pages swapped in (disable)", fig(result.pages_swapped_in)),
        ("dirty tracking", result.dirty_tracking),
        ("guest first-touch latency p50 (re-touch)", fig(result.retouch_p50_us, "us", "{:.1f}")),
        ("guest first-touch latency p99 (re-touch)", fig(result.retouch_p99_us, "us", "{:.1f}")),
        ("guest re-touch time", fig(result.retouch_seconds, "s", "{:.3f}")),
    ]
    for c in result.cycles:
        rows.append((f"cycle {c['cycle']}: moved / released / written",
                     f"{c['pages_moved']:,} / {c['pages_released']:,} / "
                     f"{c.get('pages_written', 0):,} pages"))
        rows.append((f"cycle {c['cycle']}: enable / VM frozen",
                     f"{c['enable_seconds'] * 1000:.1f} / {c['frozen_seconds'] * 1000:.1f} ms"))
    rows += [(f"time: {p['phase']}", f"{p['seconds']:.2f} s") for p in result.phases]
    rows.append(("checksums verified", f"{result.checksum_chunks - result.checksum_mismatches}"
                                       f"/{result.checksum_chunks}"))
    rows.append(("wrong qwords", f"{result.pattern_mismatches}"))
    if result.error:
        rows.append(("error", result.error))
    rows.append(("VERIFICATION", result.verdict))
    width = max(len(k) for k, _ in rows)
    line = "-" * min(100, width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k:<{width}} | {v}" for k, v in rows)
    return f"{line}\n{body}\n{line}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vmmswap demo`` (and ``python -m vmmswap.vm.demo``)."""
    args = parse_args(argv)
    out = sys.stdout
    try:
        demo = Demo(args, out)
    except ValueError as exc:
        print(f"vmmswap demo: {exc}", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        result = demo.run()
    except KvmUnavailableError as exc:
        print(f"vmmswap demo: {exc}", file=sys.stderr)
        return 2
    except GuestBuildError as exc:
        print(f"vmmswap demo: {exc}", file=sys.stderr)
        return 2
    print(format_table(result), file=out)
    print(f"total {time.monotonic() - start:.1f} s", file=out)
    if args.json:
        print(json.dumps(asdict(result), sort_keys=True), file=out)
    return 0 if result.verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
