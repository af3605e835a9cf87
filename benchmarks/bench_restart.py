"""Time from the monitor's SIGKILL to the first fault served by its successor.

    python benchmarks/bench_restart.py [--kills N] [--swapped-mib M] [--fresh-kills K] [--json]

Two guests, one after the other: 1 GiB, and 16 GiB sparse; each gets M MiB (default 512) of
non-zero data, enable and out (everything to the swap file), then N kills (default 100). Each
kill: SIGKILL the monitor, then read one swapped-out page this process never read before (a
ctypes memmove, GIL released: it blocks in the fault until a successor serves it). Reported per
guest, p50 / p99 of:

* ``first_fault_ms``: the kill to the read's return (the number the target is about);
* ``resume_ms``: the successor's own figure (``status.last_resume_seconds``: the death, as the
  controller's watch thread saw it, to the successor ready to serve).

Before each kill the spare monitor is ready (its imports done: /proc/PID/comm is "swap
monitor"), as it is in a VM that does not crash in a loop. ``--fresh-kills`` more kills per guest
run without a spare (a fresh interpreter per successor), to show where the time goes otherwise.
Targets (issue 12): p99 <= 250 ms; the 16 GiB guest <= 1.5x the 1 GiB one (the successor maps
the page state, it does not rebuild it). Every page read is checked; one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from vmmswap.control.controller import RestartPolicy, SwapController  # noqa: E402
from vmmswap.dataplane.guest_memory import GuestMemory  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096


def _pattern(page: int) -> bytes:
    return np.full(PAGE // 8, page * 0x9E3779B97F4A7C15 % (1 << 64) | 1, dtype=np.uint64).tobytes()


def _fill(memory: GuestMemory, swapped: int) -> None:
    chunk = 4 * MIB
    for off in range(0, swapped, chunk):
        pages = np.arange(off // PAGE, (off + chunk) // PAGE, dtype=np.uint64)
        words = np.repeat(pages * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1), PAGE // 8)
        memory.write(off, words.tobytes())


def _spare_ready(ctl: SwapController, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = ctl.spare_pid
        if pid is not None:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "swap monitor":
                        return
            except OSError:
                pass
        time.sleep(0.01)
    raise TimeoutError("the spare monitor did not become ready")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _kills(ctl: SwapController, memory: GuestMemory, pages: list[int], spare: bool,
           ) -> tuple[list[float], list[float]]:
    first, resume = [], []
    for page in pages:
        if spare:
            _spare_ready(ctl)
        before = ctl.restarts
        pid = ctl.monitor_pid
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        data = memory.read(page * PAGE, PAGE)  # blocks in the fault until a successor serves
        first.append((time.monotonic() - t0) * 1000)
        if data != _pattern(page):
            raise SystemExit(f"page {page} came back wrong after a restart")
        while ctl.restarts == before:  # the callback side: wait until the swap is done
            time.sleep(0.001)
        resume.append(ctl.status().last_resume_seconds * 1000)
    return first, resume


def run_guest(size: int, swapped: int, kills: int, fresh: int, swap_dir: str) -> dict[str, Any]:
    memory = GuestMemory.create([(0, size)], name=f"bench-restart-{size >> 30}g")
    try:
        _fill(memory, swapped)
        ctl = SwapController.launch(memory, swap_dir, readahead=False,
                                    restart_policy=RestartPolicy(10**6, 0.001, spare=True),
                                    on_monitor_restarted=None)
        try:
            t = time.monotonic()
            ctl.enable()
            ctl.swap_out(wait=True, timeout=600)
            setup = time.monotonic() - t
            rng = np.random.default_rng(size)
            pages = [int(p) for p in rng.choice(swapped // PAGE, kills + fresh, replace=False)]
            first, resume = _kills(ctl, memory, pages[:kills], spare=True)
            result: dict[str, Any] = {
                "guest_gib": size / GIB, "swapped_mib": swapped // MIB, "kills": kills,
                "setup_s": round(setup, 1),
                "first_fault_ms": {"p50": round(_pct(first, 0.5), 2),
                                   "p99": round(_pct(first, 0.99), 2),
                                   "max": round(max(first), 2),
                                   "mean": round(statistics.fmean(first), 2)},
                "resume_ms": {"p50": round(_pct(resume, 0.5), 2),
                              "p99": round(_pct(resume, 0.99), 2)},
            }
            if fresh:
                ctl.policy = RestartPolicy(10**6, 0.001, spare=False)
                spare_pid = ctl.spare_pid
                if spare_pid is not None:  # make the next successor a fresh interpreter
                    os.kill(spare_pid, signal.SIGKILL)
                first_f, resume_f = _kills(ctl, memory, pages[kills:], spare=False)
                result["no_spare"] = {"kills": fresh,
                                      "first_fault_ms_p50": round(_pct(first_f, 0.5), 1),
                                      "first_fault_ms_p99": round(_pct(first_f, 0.99), 1),
                                      "resume_ms_p50": round(_pct(resume_f, 0.5), 1)}
            status = ctl.status()
            assert status.restarts == kills + fresh, status
            ctl.disable(wait=True, timeout=600)
        finally:
            ctl.close()
        return result
    finally:
        memory.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--fresh-kills", type=int, default=10)
    parser.add_argument("--swapped-mib", type=int, default=512)
    parser.add_argument("--swap-dir", default=None)
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    args = parser.parse_args()
    signal.alarm(3600)  # a fault that is never served must not hang the run for ever
    swapped = args.swapped_mib * MIB
    with tempfile.TemporaryDirectory(prefix="bench-restart-", dir=args.swap_dir) as swap_dir:
        small = run_guest(1 * GIB, swapped, args.kills, args.fresh_kills, swap_dir)
        if not args.json:
            print("1 GiB:", json.dumps(small), flush=True)
        big = run_guest(16 * GIB, swapped, args.kills, args.fresh_kills, swap_dir)
        if not args.json:
            print("16 GiB sparse:", json.dumps(big), flush=True)
    ratio = big["first_fault_ms"]["p99"] / max(small["first_fault_ms"]["p99"], 1e-9)
    summary = {"bench": "restart", "1gib": small, "16gib": big,
               "p99_ratio_16_to_1": round(ratio, 2),
               "target_p99_ms": 250, "target_ratio": 1.5,
               "met": small["first_fault_ms"]["p99"] <= 250 and big["first_fault_ms"]["p99"]
               <= 250 and ratio <= 1.5}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
