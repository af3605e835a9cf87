"""Snapshot restore of the micro-VM: lazy (Firecracker's handshake) vs eager, with and without a
recorded working set (issue 14).

    python benchmarks/bench_snapshot.py [--repeat N] [--ws-mib M] [--written-mib W] [--json]

Two snapshots are taken of the built-in guest, 1 GiB and 4 GiB, each with W MiB written
(default 768: the working set of M MiB, default 256, at the start of the data area, the rest
elsewhere) and the remaining memory never touched, so the memory files are sparse. The memory
files stay in the page cache (just written); both sides of every ratio read them warm. Each
restore runs in this process (vCPU threads fault inside KVM_RUN, GIL released) with
``vmmswap serve-snapshot`` as a child process that is listening before the clock starts, as a
Firecracker handler is. Median of N (default 5) for every figure:

* ``first_exit_ms``: from the start of the restore (creating guest memory) to the guest's first
  exit -- its first instruction, the re-executed ``in`` of its command port, has run. Lazy
  needs one fault (the code page) served; eager first copies the memory file's data extents
  (SEEK_DATA; holes are skipped, as a sensible eager loader does). Targets: lazy <= 10 ms;
  lazy 4 GiB <= 1.2x lazy 1 GiB.
* re-touch: right after the first exit the guest reads every qword of the M MiB working set.
  On demand (recording the working set with ``--record-working-set``) vs given the recorded
  file (``--working-set``: prefetched in 4 MiB batches from the handshake on). Targets: >= 3x
  faster with it, >= 90 % fewer faults (the handler's fault count, whole restore).
* ``second_read_ms``: the same read once more (nothing left to fault, in userfaultfd or in
  KVM): with the eager re-touch it shows what the first touch of a page costs KVM itself.
* ``to_end_ms``: restore start to the end of the re-touch, lazy with the working set vs eager.
  Target: faster.

Every re-touch is checked: the guest's sum of the working set must equal the sum the source
guest reported before the snapshot. One JSON line at the end with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from vmmswap.vm.micro import MicroVM  # noqa: E402
from vmmswap.vm.restore import RestoredVM, handler_stats, start_handler  # noqa: E402
from vmmswap.vm.snapshot import MEMORY_FILE, STATE_FILE, snapshot_micro_vm  # noqa: E402
from vmmswap.vm.vm_state import load_state  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


def take_snapshot(out: Path, size: int, ws: int, written: int) -> int:
    """Snapshot a guest of ``size`` bytes with ``written`` bytes of data; the WS's read sum."""
    with MicroVM(size, vcpus=1, regions=2) as vm:
        vm.start()
        w = vm.workload
        w.fill(0, ws, 1)
        rest = written - ws
        if rest > 0:
            w.fill(vm.layout.data_size - rest, rest, 2)  # far from the working set
        total = w.read(0, ws).read_sum
        snapshot_micro_vm(vm, out, guest={"ws_sum": total})
        vm.shutdown()
    return total


def one_restore(snap: Path, tmp: Path, *, lazy: bool, ws_bytes: int = 0,
                working_set: str | None = None, record: str | None = None) -> dict[str, Any]:
    state = load_state(str(snap / STATE_FILE))
    child = None
    sock = str(tmp / "h.sock")
    if lazy:
        child = start_handler(str(snap / MEMORY_FILE), sock, working_set=working_set,
                              record=record)
    try:
        vm = RestoredVM(state, handler_socket=sock if lazy else None,
                        mem_file=None if lazy else str(snap / MEMORY_FILE))
        with vm:
            vm.start()
            while vm.device.first_exit[0] is None:
                if not vm.machine.running:
                    raise RuntimeError(f"restored guest stopped: {vm.machine.stop_reason}")
                time.sleep(0.0002)
            first = vm.device.first_exit[0]
            out: dict[str, Any] = {"first_exit_ms": (first - vm.t_created) * 1000,
                                   "machine_ms": vm.timings["machine"] * 1000}
            if ws_bytes:
                t0 = time.monotonic()
                report = vm.workload.read(0, ws_bytes)
                t1 = time.monotonic()
                if report.read_sum != state.guest["ws_sum"]:
                    raise RuntimeError("the re-touched working set does not match the "
                                       "snapshot's")
                out["retouch_ms"] = (t1 - t0) * 1000
                out["to_end_ms"] = (t1 - vm.t_created) * 1000
                # Again, every page now mapped in KVM too: what the guest's reading costs.
                t2 = time.monotonic()
                vm.workload.read(0, ws_bytes)
                out["second_read_ms"] = (time.monotonic() - t2) * 1000
            vm.shutdown()
        if child is not None:
            stats = handler_stats(child)
            child = None
            out["faults"] = stats["faults"]
            out["prefetched"] = stats["pages_prefetched"]
        return out
    finally:
        if child is not None:
            child.kill()
            child.communicate(timeout=10)


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ws-mib", type=int, default=256)
    parser.add_argument("--written-mib", type=int, default=768)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ws = args.ws_mib * MIB
    res: dict[str, Any] = {"repeat": args.repeat, "ws_mib": args.ws_mib,
                           "written_mib": args.written_mib}
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as d:
        tmp = Path(d)
        snaps = {}
        for name, size in (("1g", GIB), ("4g", 4 * GIB)):
            snaps[name] = tmp / name
            take_snapshot(snaps[name], size, ws, args.written_mib * MIB)
        for name, snap in snaps.items():
            for mode in ("lazy", "eager"):
                runs = [one_restore(snap, tmp, lazy=mode == "lazy")
                        for _ in range(args.repeat)]
                res[f"first_exit_ms_{mode}_{name}"] = median(runs, "first_exit_ms")
                # KVM VM + vCPU + memory slots: the part that grows with guest size.
                res[f"machine_ms_{mode}_{name}"] = median(runs, "machine_ms")
                print(f"{name} {mode}: first exit {res[f'first_exit_ms_{mode}_{name}']:.2f} ms",
                      file=sys.stderr)
        wsfile = str(tmp / "ws.npy")
        demand = [one_restore(snaps["1g"], tmp, lazy=True, ws_bytes=ws, record=wsfile)
                  for _ in range(args.repeat)]
        with_ws = [one_restore(snaps["1g"], tmp, lazy=True, ws_bytes=ws, working_set=wsfile)
                   for _ in range(args.repeat)]
        eager = [one_restore(snaps["1g"], tmp, lazy=False, ws_bytes=ws)
                 for _ in range(args.repeat)]
    for label, runs in (("demand", demand), ("ws", with_ws), ("eager", eager)):
        for key in ("retouch_ms", "to_end_ms", "faults", "prefetched", "second_read_ms"):
            if key in runs[0]:
                res[f"{key}_{label}"] = median(runs, key)
    res["lazy_4g_over_1g"] = res["first_exit_ms_lazy_4g"] / res["first_exit_ms_lazy_1g"]
    res["eager_over_lazy_first_exit_1g"] = (res["first_exit_ms_eager_1g"]
                                            / res["first_exit_ms_lazy_1g"])
    res["retouch_speedup_ws"] = res["retouch_ms_demand"] / res["retouch_ms_ws"]
    res["fault_reduction_ws"] = 1 - res["faults_ws"] / res["faults_demand"]
    res["eager_over_lazy_ws_to_end"] = res["to_end_ms_eager"] / res["to_end_ms_ws"]
    # The re-touch floor: the eager guest faults on nothing in userfaultfd, yet its first touch
    # of each page still costs KVM a mapping; what a working set can remove is the rest.
    floor = res["retouch_ms_eager"]
    res["retouch_over_floor_ms_demand"] = res["retouch_ms_demand"] - floor
    res["retouch_over_floor_ms_ws"] = res["retouch_ms_ws"] - floor
    res["lazy_4g_over_1g_without_machine"] = (
        (res["first_exit_ms_lazy_4g"] - res["machine_ms_lazy_4g"])
        / (res["first_exit_ms_lazy_1g"] - res["machine_ms_lazy_1g"]))
    verdicts = [
        ("lazy first exit 1 GiB <= 10 ms", res["first_exit_ms_lazy_1g"] <= 10),
        ("lazy 4 GiB / 1 GiB <= 1.2", res["lazy_4g_over_1g"] <= 1.2),
        ("re-touch with working set >= 3x faster", res["retouch_speedup_ws"] >= 3),
        ("faults >= 90 % fewer with working set", res["fault_reduction_ws"] >= 0.9),
        ("lazy+ws to end faster than eager", res["eager_over_lazy_ws_to_end"] > 1),
    ]
    for text, met in verdicts:
        print(f"{text}: {'met' if met else 'MISSED'}", file=sys.stderr)
    res["targets_met"] = {text: met for text, met in verdicts}
    if args.json:
        print(json.dumps(res))
    else:
        for key, value in res.items():
            if key != "targets_met":
                print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
