"""``vmmswap demo --guest memtest86+``: Debian's memtest86+ tests guest memory under vmm-swap.

memtest is an oracle nobody here wrote: it writes patterns over its range and counts every
mismatch. The demo boots it (image from ``scripts/fetch-memtest.sh``), selects test #5 (a
random pattern that changes every pass) over a small range (PVM emulates every instruction),
waits for a clean pass, then runs enable -> trim -> out -> a full pass while Active, the same
again, disable -> a pass, with memtest testing throughout. The final table puts memtest's own
pass and error counts beside vmm-swap's state and page counters for every pass. PASS (exit 0)
only when every pass completed and memtest reported zero errors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmmswap.control.controller import SwapController
from vmmswap.vm.kvm import KvmUnavailableError
from vmmswap.vm.memtest.guest import MemtestConfig, MemtestGuest
from vmmswap.vm.memtest.image import find_image
from vmmswap.vm.memtest.session import Selection, SwapPassesResult, configure, run_swap_passes

Report = Callable[[str], None]

#: Passes the demo waits for: one before swap, one per swap cycle, one after disable.
CYCLES = 2


@dataclass
class DemoResult:
    result: SwapPassesResult
    cycles: int
    seconds: float
    #: memtest's screen at the end (its CPU line shows "SMP: 2T" when both vCPUs test).
    screen: str = ""

    @property
    def expected_passes(self) -> int:
        return self.cycles + 2

    @property
    def ok(self) -> bool:
        return len(self.result.passes) == self.expected_passes and self.result.errors == 0

    def table(self) -> list[str]:
        """memtest's counters beside vmm-swap's, one row per pass, then the swap commands."""
        head = (f"{'phase':<16}{'swap state':<12}{'secs':>6}{'mt pass':>8}{'mt errors':>10}"
                f"{'from file':>10}{'from staging':>13}{'in file':>8}{'staged':>7}")
        rows = [head, "-" * len(head)]
        for p in self.result.passes:
            m = p.metrics
            rows.append(f"{p.phase:<16}{p.swap_state:<12}{p.seconds:6.1f}{p.status.passes:8d}"
                        f"{p.status.errors:10d}{m.get('copied_from_file_pages', 0):10d}"
                        f"{m.get('copied_from_staging_pages', 0):13d}"
                        f"{m.get('swap_pages', 0):8d}{m.get('staging_pages', 0):7d}")
        rows.append("")
        rows.append("swap commands: " + ", ".join(
            f"{s.name} -> {s.state} {s.seconds:.2f} s ({s.pages} pages)"
            for s in self.result.steps))
        rows.append("(page columns are vmm-swap's counters at the end of the pass; the fault "
                    "counters count since the last enable)")
        return rows


def run_demo(image: Path | None = None, swap_dir: Path | None = None, *, cycles: int = CYCLES,
             vcpus: int = 1, selection: Selection | None = None, pass_timeout: float = 120.0,
             report: Report | None = None) -> DemoResult:
    """Boot memtest under vmm-swap and run the swap cycles while it tests (see the module)."""
    say = report if report is not None else (lambda _: None)
    path = find_image(image)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmmswap-memtest-") as scratch:
        guest = MemtestGuest(path, MemtestConfig.smp(vcpus))
        controller: SwapController | None = None
        try:
            controller = SwapController.launch(
                guest.memory, swap_dir if swap_dir is not None else Path(scratch))
            guest.start()
            chosen = selection if selection is not None else Selection()
            configure(guest, chosen)
            low, high = chosen.range_bytes
            say(f"memtest started on {vcpus} vCPU(s): tests {chosen.tests} over "
                f"{low:#x}-{high:#x}")
            result = run_swap_passes(guest, controller, cycles=cycles,
                                     pass_timeout=pass_timeout, report=say)
            screen = guest.screen().text()
        finally:
            guest.machine.close()
            if controller is not None:
                controller.close()
            guest.close()
    return DemoResult(result, cycles, time.monotonic() - start, screen)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmmswap demo --guest memtest86+",
        description="Run Debian's memtest86+ under vmm-swap through two swap cycles.")
    parser.add_argument("--guest", default="memtest86+", help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, default=None,
                        help="directory holding memtest86+x64.bin (default: the fetch cache)")
    parser.add_argument("--swap-dir", type=Path, default=None,
                        help="directory for the swap file (default: a temporary directory)")
    parser.add_argument("--cycles", type=int, default=CYCLES,
                        help=f"swap cycles, each ending in a pass while Active (default {CYCLES})")
    parser.add_argument("--vcpus", type=int, default=1,
                        help="vCPUs; with 2 memtest tests on both (its SMP mode; default 1)")
    parser.add_argument("--pass-timeout", type=float, default=120.0,
                        help="seconds one memtest pass may take (default 120)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def report(line: str) -> None:
        print(f"[vmmswap] {line}", flush=True)

    try:
        demo = run_demo(args.image, args.swap_dir, cycles=args.cycles, vcpus=args.vcpus,
                        pass_timeout=args.pass_timeout, report=report)
    except FileNotFoundError as exc:
        print(f"vmmswap demo --guest memtest86+: {exc}", file=sys.stderr)
        return 2
    except (KvmUnavailableError, OSError, RuntimeError, TimeoutError, ValueError) as exc:
        print(f"vmmswap demo --guest memtest86+: {exc}", file=sys.stderr)
        return 1
    for row in demo.table():
        print(row)
    verdict = "PASS" if demo.ok else "FAIL"
    print(f"{verdict}: {len(demo.result.passes)}/{demo.expected_passes} memtest passes, "
          f"{demo.result.errors} errors, {demo.seconds:.0f} s")
    return 0 if demo.ok else 1


if __name__ == "__main__":
    sys.exit(main())
