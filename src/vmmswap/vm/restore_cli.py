"""``vmmswap restore DIR``: bring a snapshot back and let the guest verify its memory.

Memory comes from one of three places:

* ``--handler-socket S``: a page-fault handler already listening at S (``vmmswap
  serve-snapshot``, or any Firecracker handler) gets Firecracker's handshake; lazy.
* ``--serve``: the same, with ``vmmswap serve-snapshot`` started here as a child process on a
  private socket (``--working-set`` / ``--record-working-set`` are passed to it); lazy.
* ``--eager``: the memory file is copied into guest memory before the guest runs.

A diff snapshot (written by ``--diff-snapshot OUT``: the pages the guest wrote or gave back
since the restore, over its base) restores the same way; its base's memory file is served
underneath (``serve-snapshot --overlay``).

Then the guest checksums and verifies its memory against what it recorded at snapshot time
(:func:`~vmmswap.vm.snapshot_check.check_guest`) and exits. Prints one JSON line (time from the
start of the restore to the guest's first exit, the check's verdict, the handler's counters);
exit 0 when every check passed, 1 when one failed or the restore could not be made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from vmmswap.vm.kvm import KvmUnavailableError
from vmmswap.vm.restore import (
    RestoredVM,
    RestoreError,
    handler_stats,
    memory_files,
    start_handler,
    stop_handler,
)
from vmmswap.vm.snapshot import STATE_FILE, SnapshotError, snapshot_micro_vm
from vmmswap.vm.snapshot_check import change_guest
from vmmswap.vm.vm_state import VmStateError, load_state
from vmmswap.vm.workload import WorkloadError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmmswap restore",
        description="Restore a snapshot written by `vmmswap snapshot` and have the guest "
                    "verify every checksum it recorded.")
    parser.add_argument("dir", metavar="DIR", help="the snapshot directory")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--handler-socket", metavar="SOCKET",
                     help="lazy: send Firecracker's handshake to the handler listening here")
    how.add_argument("--serve", action="store_true",
                     help="lazy: start `vmmswap serve-snapshot` as a child and use it")
    how.add_argument("--eager", action="store_true",
                     help="copy the whole memory file into guest memory first")
    parser.add_argument("--working-set", metavar="FILE",
                        help="with --serve: prefetch this recorded working set")
    parser.add_argument("--record-working-set", metavar="FILE",
                        help="with --serve: record the pages faulted on demand into FILE")
    parser.add_argument("--diff-snapshot", metavar="OUT",
                        help="after the check, have the guest change some memory and write a "
                             "diff snapshot (only the pages written since the restore) to OUT")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="give up on a guest command after SECONDS (default 300)")
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.working_set or args.record_working_set) and not args.serve:
        parser.error("--working-set and --record-working-set need --serve (otherwise give "
                     "them to your serve-snapshot)")
    state_path = os.path.join(args.dir, STATE_FILE)
    private_dir: str | None = None
    child: subprocess.Popen[str] | None = None
    out: dict[str, Any] = {}
    try:
        state = load_state(state_path)
        mem_file, overlay, overlay_pages = memory_files(args.dir, state)
        if args.diff_snapshot and overlay is not None:
            raise ValueError("a diff snapshot of a VM restored from a diff is not supported: "
                             "restore the full snapshot")
        socket_path = args.handler_socket
        if args.serve:
            private_dir = tempfile.mkdtemp(prefix="vmmswap-restore-")
            socket_path = os.path.join(private_dir, "handler.sock")
            child = start_handler(mem_file, socket_path, working_set=args.working_set,
                                  record=args.record_working_set, overlay=overlay,
                                  overlay_pages=overlay_pages)
        with RestoredVM(state, handler_socket=socket_path,
                        mem_file=mem_file if args.eager else None, overlay=overlay,
                        overlay_pages=overlay_pages,
                        dirty_log=bool(args.diff_snapshot)) as vm:
            report, result = vm.start_and_check(args.timeout)
            out.update(report)
            if args.diff_snapshot and result.ok:
                guest = change_guest(vm.workload, state.guest)
                info = snapshot_micro_vm(vm, args.diff_snapshot, guest=guest,
                                         diff=vm.written_pages(), base=args.dir)
                out["diff"] = {"memory": str(info.memory_path), "data_bytes": info.data_bytes}
            vm.shutdown()
        if child is not None:
            out["handler"] = handler_stats(child)
            child = None
    except (KvmUnavailableError, VmStateError, RestoreError, WorkloadError, SnapshotError,
            OSError, ValueError, KeyError) as err:
        print(f"vmmswap restore: {err}", file=sys.stderr)
        return 1
    finally:
        if child is not None:
            stop_handler(child)
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
    print(json.dumps(out), flush=True)
    if not out.get("ok"):
        print(f"vmmswap restore: the guest's check failed: {out.get('check')}", file=sys.stderr)
        return 1
    return 0
