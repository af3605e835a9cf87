"""``vmmswap run``: the built-in guest, kept running under vmm-swap until it is parked or stopped.

The VM that the other commands act on from outside::

    vmmswap run --control-socket /run/vm1.swap --vmm-socket /run/vm1.sock &
    vmmswap enable /run/vm1.swap && vmmswap out /run/vm1.swap     # the monitor's socket
    vmmswap park /run/vm1.sock s3://bucket/vm1/now                 # the VMM's socket
    vmmswap resume s3://bucket/vm1/now                             # anywhere, lazily

At start the guest fills part of its memory and checksums all of it (what ``resume`` has it
verify); one JSON line says it runs. A committed park stops it (exit 0, a JSON line with the
park's figures). SIGTERM or SIGINT stop it instead: the guest verifies its checksums (through
whatever vmm-swap has done to its memory meanwhile), everything is swapped back in, and the
exit status is 0 only if every checksum held.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from typing import Any

from vmmswap.control.controller import SwapController
from vmmswap.control.errors import SwapError
from vmmswap.vm.kvm import KvmUnavailableError
from vmmswap.vm.micro import MIB, MicroVM
from vmmswap.vm.park_running import park_running
from vmmswap.vm.snapshot_check import check_guest, prepare_guest
from vmmswap.vm.vmm_socket import VmmSocket
from vmmswap.vm.workload import WorkloadError

__all__ = ["main"]


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with MicroVM(args.memory * MIB, vcpus=args.vcpus, regions=args.regions) as vm:
        ctl = SwapController.launch(vm.memory, args.swap_dir or tempfile.gettempdir(),
                                    control_socket=args.control_socket,
                                    dirty_tracking=args.dirty_tracking)
        server: VmmSocket | None = None
        try:
            vm.start()
            guest = prepare_guest(vm.workload, written_fraction=args.written)

            def park(url: str) -> dict[str, Any]:
                out = park_running(vm, ctl, url, guest=guest)
                out["checksums"] = len(guest["checksums"])
                return out

            server = VmmSocket(args.vmm_socket, park)
            print(json.dumps({"running": True, "vmm_socket": args.vmm_socket,
                              "control_socket": args.control_socket,
                              "checksums": len(guest["checksums"])}), flush=True)
            while not stop.wait(0.1):
                if server.parked.is_set():
                    print(json.dumps({"parked": server.result}), flush=True)
                    return 0
            server.close()
            server = None
            check = check_guest(vm.workload, guest)
            print(json.dumps({"stopped": True, "ok": check.ok, "check": check.describe()}),
                  flush=True)
            vm.shutdown()
            return 0 if check.ok else 1
        finally:
            if server is not None:
                server.close()
            ctl.close()   # parked: releases everything; otherwise swaps in and stops


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vmmswap run", description="Run the built-in guest under vmm-swap until it is "
        "parked (vmmswap park VMM_SOCKET URL) or stopped (SIGTERM).")
    parser.add_argument("--vmm-socket", required=True, metavar="PATH",
                        help="this VMM's socket, for `vmmswap park PATH URL`")
    parser.add_argument("--control-socket", metavar="PATH",
                        help="the monitor's control socket (vmmswap enable/trim/out/...)")
    parser.add_argument("--memory", type=int, default=256, metavar="MIB")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--regions", type=int, choices=(1, 2), default=2)
    parser.add_argument("--written", type=float, default=0.5, metavar="FRACTION",
                        help="the part of its memory the guest fills at start")
    parser.add_argument("--swap-dir", metavar="DIR")
    parser.add_argument("--dirty-tracking", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.written <= 1:
        parser.error("--written must be in (0, 1]")
    try:
        return run(args)
    except (KvmUnavailableError, SwapError, WorkloadError, OSError, ValueError) as err:
        print(f"vmmswap run: {err}", file=sys.stderr)
        return 1
