"""How long a KVM guest takes to re-touch its working set after `vmmswap out`.

One command, three configurations measured in the same run, each on a fresh micro-VM:

* floor      -- swap never enabled: the guest re-reads a resident working set;
* readahead  -- fill, enable, out, then the guest re-reads the working set (faults served from
                the swap file with readahead);
* no-readahead -- the same with readahead off (one page per fault);
* random, random-no-readahead -- fill, enable, out, then the guest touches ``--random-pages``
                single pages at random offsets of the working set, one command each (a guest
                resuming from idle: every touch is a fault served by the monitor, which has been
                idle in between, so each pays the cross-CPU wake-up the adaptive spin is for).
                Only the latencies count here (the host's command per page dominates the time).

The guest times the whole pass and the first touch of every page with the TSC, so the figures are
what the guest observes, not host-side estimates. Each configuration runs ``--repeat`` times and
the median pass is reported; the machine is shared and noisy, so compare the ratios, not the
absolute numbers.

    python benchmarks/bench_vm.py [--working-set MIB] [--repeat N] [--swap-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from vmmswap.vm.guest_build import build_guest
from vmmswap.vm.micro import MicroVM
from vmmswap.vm.swap_session import (
    SwapUnavailableError,
    launch_controller,
    metrics_dict,
    wait_for_state,
)

MIB = 1 << 20
PAGE = 4096


@dataclass
class Pass:
    guest_s: float
    wall_s: float
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float
    metrics: dict[str, int] = field(default_factory=dict)


def _random_touch(w: Any, working_set: int, count: int, seed: int) -> Any:
    """Touch ``count`` distinct random pages one command at a time; the merged report."""
    rng = random.Random(seed)
    pages = rng.sample(range(working_set // PAGE), min(count, working_set // PAGE))
    merged: Any = None
    for page in pages:
        report = w.read(page * PAGE, PAGE, vcpus=[0])
        if merged is None:
            merged = report
        else:
            assert merged.latency is not None and report.latency is not None
            merged.latency.merge(report.latency)
            merged.guest_s += report.guest_s
            merged.wall_s += report.wall_s
    return merged


def one_pass(config: str, working_set: int, vcpus: int, swap_dir: str,
             random_pages: int = 2000, seed: int = 0) -> Pass:
    memory = working_set + 64 * MIB
    with MicroVM(memory, vcpus=vcpus, regions=2, program=build_guest()) as vm:
        ctl: Any = None
        if config != "floor":
            ctl = launch_controller(vm.memory, swap_dir,
                                    readahead=config in ("readahead", "random"))
        try:
            vm.start()
            w = vm.workload
            w.fill(0, working_set, seed=1)
            metrics: dict[str, int] = {}
            if ctl is not None:
                ctl.enable()
                ctl.swap_out()
                wait_for_state(ctl.status, {"Active"}, timeout=600)
            if config.startswith("random"):
                report = _random_touch(w, working_set, random_pages, seed)
            else:
                report = w.read(0, working_set)
            if ctl is not None:
                metrics = metrics_dict(ctl.status())
                ctl.disable()
                wait_for_state(ctl.status, {"Ready"}, timeout=600)
            if w.verify(0, working_set, seed=1).mismatches:
                raise RuntimeError(f"{config}: guest memory corrupted")
            vm.shutdown()
        finally:
            if ctl is not None:
                ctl.close()
    lat = report.latency
    assert lat is not None
    return Pass(guest_s=report.guest_s, wall_s=report.wall_s, p50_us=lat.percentile_us(50),
                p99_us=lat.percentile_us(99), p999_us=lat.percentile_us(99.9),
                max_us=lat.percentile_us(100), metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--working-set", type=int, default=256, metavar="MIB")
    parser.add_argument("--vcpus", type=int, default=2,
                        help="vCPUs; the re-touch is split across them (default 2)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--swap-dir", default=None)
    parser.add_argument("--random-pages", type=int, default=2000,
                        help="pages touched one at a time by the random configs (default 2000)")
    parser.add_argument("--configs", default="floor,readahead,no-readahead,random,"
                        "random-no-readahead", help="comma-separated configurations to run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    working_set = args.working_set * MIB
    results: dict[str, list[Pass]] = {}
    with tempfile.TemporaryDirectory(dir=args.swap_dir) as swap_dir:
        for config in args.configs.split(","):
            runs: list[Pass] = []
            for i in range(args.repeat):
                try:
                    runs.append(one_pass(config, working_set, args.vcpus, swap_dir,
                                         args.random_pages, seed=i))
                except SwapUnavailableError as exc:
                    print(f"{config}: skipped, {exc}", flush=True)
                    break
                p = runs[-1]
                print(f"{config:>19} run {i + 1}: guest {p.guest_s * 1e3:9.1f} ms  "
                      f"p50 {p.p50_us:8.2f} us  p99 {p.p99_us:8.2f} us", flush=True)
            if runs:
                results[config] = runs

    def median(config: str) -> Pass:
        runs = sorted(results[config], key=lambda p: p.guest_s)
        return runs[len(runs) // 2]

    print(f"\nre-touch of a {args.working_set} MiB working set after `out`, {args.vcpus} vCPUs "
          f"(median of {args.repeat}; guest TSC timing)")
    print(f"{'config':>19} | {'guest time':>10} | {'vs floor':>9} | {'p50':>9} | {'p99':>9} | "
          f"{'p99.9':>9} | {'from file':>9} | {'readahead':>9}")
    summary: dict[str, Any] = {}
    for config, runs in results.items():
        p = median(config)
        ratio = (p.guest_s / median("floor").guest_s
                 if "floor" in results and not config.startswith("random") else float("nan"))
        summary[config] = {**asdict(p), "ratio_vs_floor": ratio,
                           "all_guest_s": [r.guest_s for r in runs]}
        print(f"{config:>19} | {p.guest_s * 1e3:8.1f}ms | {ratio:8.1f}x | {p.p50_us:7.1f}us | "
              f"{p.p99_us:7.1f}us | {p.p999_us:7.1f}us | "
              f"{p.metrics.get('copied_from_file_pages', 0):>9} | "
              f"{p.metrics.get('readahead_pages', 0):>9}")
    if "readahead" in results and "no-readahead" in results:
        speedup = median("no-readahead").guest_s / median("readahead").guest_s
        summary["readahead_speedup"] = speedup
        print(f"\nreadahead speed-up over page-at-a-time: {speedup:.2f}x")
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
