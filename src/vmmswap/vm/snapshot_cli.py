"""``vmmswap snapshot DIR``: boot the built-in guest, let it write and checksum memory, snapshot.

A practical shape for a VMM without a long-running API: the command starts the micro-VM, has
the guest fill part of its memory with seeded patterns and checksum all of it
(:func:`~vmmswap.vm.snapshot_check.prepare_guest`), pauses it at its safe point, writes
``DIR/vmstate.json`` and ``DIR/memory`` (Firecracker's memory-file layout) and shuts the guest
down. ``vmmswap restore DIR`` brings it back and has the guest check those checksums. Prints
one JSON line; exit 0, or 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from vmmswap.vm.kvm import KvmUnavailableError
from vmmswap.vm.micro import MIB, MicroVM
from vmmswap.vm.snapshot import SnapshotError, snapshot_micro_vm
from vmmswap.vm.snapshot_check import prepare_guest
from vmmswap.vm.workload import WorkloadError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vmmswap snapshot",
        description="Run the built-in guest, have it write and checksum memory, and write a "
                    "snapshot (DIR/vmstate.json + DIR/memory in Firecracker's layout).")
    parser.add_argument("dir", metavar="DIR", help="directory to write the snapshot into")
    parser.add_argument("--memory", type=int, default=256, metavar="MIB",
                        help="guest RAM in MiB (default 256)")
    parser.add_argument("--vcpus", type=int, default=2, help="vCPUs (default 2)")
    parser.add_argument("--regions", type=int, choices=(1, 2), default=2,
                        help="memory regions (default 2: below and above 4 GiB)")
    parser.add_argument("--written", type=float, default=0.5, metavar="FRACTION",
                        help="fraction of the data area the guest writes (default 0.5; the "
                             "rest stays holes in the memory file)")
    args = parser.parse_args(argv)
    if not 0 < args.written <= 1:
        parser.error("--written must be in (0, 1]")
    try:
        with MicroVM(args.memory * MIB, vcpus=args.vcpus, regions=args.regions) as vm:
            vm.start()
            guest = prepare_guest(vm.workload, written_fraction=args.written)
            info = snapshot_micro_vm(vm, args.dir, guest=guest)
            vm.shutdown()
    except (KvmUnavailableError, SnapshotError, WorkloadError, OSError, ValueError) as err:
        print(f"vmmswap snapshot: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"state": str(info.state_path), "memory": str(info.memory_path),
                      "memory_bytes": info.memory_size, "data_bytes": info.data_bytes,
                      "pause_ms": round(info.pause_s * 1000, 2),
                      "checksums": len(guest["checksums"])}), flush=True)
    return 0
