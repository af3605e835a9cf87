"""``python -m tests.torture --seeds A:B [--kvm-seeds C:D] [--jobs N] [--corrupt]``: run host
scenarios A..B-1 and KVM micro-VM scenarios C..D-1 (``--seeds 0:0`` for KVM only).

Exit status 0 only when every scenario passed (with ``--corrupt``, the negative control: 0 only
when every scenario *detected* the injected wrong page). Each failure prints its seed; rerun
it alone with ``--seeds S:S+1``.
"""

from __future__ import annotations

import argparse
import sys

from .runner import run_seeds


def parse_seeds(text: str) -> range:
    first, _, last = text.partition(":")
    return range(int(first), int(last)) if last else range(int(first), int(first) + 1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture")
    parser.add_argument("--seeds", default="0:20", help="A:B runs seeds A..B-1; S runs S")
    parser.add_argument("--kvm-seeds", default="", help="A:B: the KVM variant's seeds")
    parser.add_argument("--jobs", type=int, default=2, help="VMM processes at once")
    parser.add_argument("--corrupt", action="store_true", help="negative control")
    parser.add_argument("--swap-dir", default=None)
    args = parser.parse_args()
    kvm = parse_seeds(args.kvm_seeds) if args.kvm_seeds else range(0)
    summary = run_seeds(parse_seeds(args.seeds), args.jobs, args.corrupt, args.swap_dir,
                        progress=True, kvm_seeds=kvm)
    print(summary.line())
    if args.corrupt:
        missed = [r["seed"] for r in summary.results if r["ok"]]
        print(f"negative control: {len(summary.results) - len(missed)} detected, "
              f"missed seeds {missed}")
        return 1 if missed else 0
    for failure in summary.failures:
        print(failure["error"])
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
