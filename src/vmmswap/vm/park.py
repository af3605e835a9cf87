"""``vmmswap park URL`` and ``vmmswap resume URL``: a VM's memory and state leave the host.

Park writes a snapshot of the built-in guest (``vmmswap snapshot``'s steps, or an existing
snapshot directory with ``--from DIR``) and uploads it to an object store: the memory file as
content-addressed chunks (:mod:`vmmswap.storage.upload`), the state file (and a recorded working
set, when given) as small files beside the manifest, the manifest last -- so a park that stops
midway leaves no snapshot, and the next park of the same guest sends only what is not already in
the pool. The local copy is removed once the manifest is up.

Resume runs on any host that can reach the store. It fetches the state file, starts
``vmmswap serve-snapshot --mem-url`` as a child process with this host's own chunk cache,
restores the micro-VM lazily through Firecracker's handshake (faults fetch verified chunks on
demand; the working set, if parked, is prefetched in parallel) and has the guest verify every
checksum it recorded before the park. One JSON line each; exit 0, or 1 with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from vmmswap.control.errors import SwapError
from vmmswap.snapshot.source import FileSource, SourceError
from vmmswap.storage.manifest import ManifestError, load_file, load_manifest
from vmmswap.storage.store import StoreError, open_store
from vmmswap.storage.upload import upload_memory
from vmmswap.vm.kvm import KvmUnavailableError
from vmmswap.vm.micro import MIB, MicroVM
from vmmswap.vm.park_running import park_running
from vmmswap.vm.restore import (
    RestoredVM,
    RestoreError,
    handler_stats,
    start_handler,
    stop_handler,
)
from vmmswap.vm.snapshot import MEMORY_FILE, STATE_FILE, SnapshotError, snapshot_micro_vm
from vmmswap.vm.snapshot_check import check_guest, prepare_guest
from vmmswap.vm.swap_session import launch_controller
from vmmswap.vm.vm_state import VmState, VmStateError, load_state
from vmmswap.vm.vmm_socket import VmmSocketError, park_request
from vmmswap.vm.workload import WorkloadError

#: Names of the small files beside the manifest.
STATE_OBJECT: Final = STATE_FILE
WORKING_SET_OBJECT: Final = "working_set.npy"



class ParkError(RuntimeError):
    """The park did not complete; the message says where the VM's memory is (a kept snapshot
    directory, or -- parking from vmm-swap -- the VM itself, which ran on)."""


_ERRORS = (ParkError, KvmUnavailableError, SnapshotError, WorkloadError, RestoreError, VmStateError,
           StoreError, ManifestError, SourceError, SwapError, OSError, ValueError, ImportError)


def park_directory(directory: str, url: str, *, working_set: str | None = None,
                   workers: int = 8) -> dict[str, Any]:
    """Upload the snapshot in ``directory`` as the snapshot at ``url``; its upload counters."""
    state = load_state(os.path.join(directory, STATE_FILE))
    if state.guest.get("base") is not None:
        raise ValueError("a diff snapshot cannot be parked on its own: park the full snapshot "
                         "(restore the diff, snapshot it in full, park that)")
    spans = [(r.file_offset, r.size) for r in state.regions]
    files = {STATE_OBJECT: Path(directory, STATE_FILE).read_bytes()}
    if working_set is not None:
        files[WORKING_SET_OBJECT] = Path(working_set).read_bytes()
    store, prefix = open_store(url)
    source = FileSource.open(os.path.join(directory, MEMORY_FILE))
    try:
        manifest, stats = upload_memory(store, prefix, source, regions=spans, workers=workers,
                                        files=files)
    finally:
        source.close()
    return {"url": url, "memory_bytes": manifest.size, "stored_bytes": manifest.stored_bytes(),
            **stats.as_dict()}


def fetch_state(url: str, into: str) -> tuple[VmState, str | None]:
    """The parked state (written to ``into``/vmstate.json and validated there) and the parked
    working set's path in ``into``, if one was parked."""
    store, prefix = open_store(url)
    manifest = load_manifest(store, prefix)
    if STATE_OBJECT not in manifest.files:
        raise ManifestError(f"{url}: a memory snapshot without a VM state (not parked by "
                            "`vmmswap park`)")
    path = os.path.join(into, STATE_FILE)
    Path(path).write_bytes(load_file(store, manifest, STATE_OBJECT))
    state = load_state(path)   # checks its own SHA-256 and every field
    regions = [(r.file_offset, r.size) for r in state.regions]
    if regions != [(r.offset, r.size) for r in manifest.regions]:
        raise VmStateError(f"{url}: the state's memory regions {regions} are not the "
                           "manifest's")
    ws = None
    if WORKING_SET_OBJECT in manifest.files:
        ws = os.path.join(into, WORKING_SET_OBJECT)
        Path(ws).write_bytes(load_file(store, manifest, WORKING_SET_OBJECT))
    return state, ws


def _park_socket(path: str, url: str) -> int:
    """``vmmswap park SOCKET URL``: ask the VMM at ``path`` to park its VM."""
    try:
        answer = park_request(path, url)
    except VmmSocketError as err:
        print(f"vmmswap park: {err}", file=sys.stderr)
        return 2
    if not answer.get("ok"):
        print(f"vmmswap park: {answer.get('error')}; the VM runs on where it was",
              file=sys.stderr)
        return 1
    print(json.dumps(answer.get("parked")), flush=True)
    return 0


def _park_swapped(args: argparse.Namespace) -> dict[str, Any]:
    """The built-in guest under vmm-swap, its memory swapped out (enable, out), parked from
    where it lies (:func:`~vmmswap.vm.park_running.park_running`)."""
    files = {WORKING_SET_OBJECT: Path(args.working_set).read_bytes()} if args.working_set \
        else None
    with MicroVM(args.memory * MIB, vcpus=args.vcpus, regions=args.regions) as vm:
        ctl = launch_controller(vm.memory, args.swap_dir or tempfile.gettempdir())
        try:
            vm.start()
            guest = prepare_guest(vm.workload, written_fraction=args.written)
            ctl.enable()
            ctl.swap_out(wait=True, timeout=args.timeout)
            try:
                out = park_running(vm, ctl, args.url, guest=guest, files=files)
            except _ERRORS as err:
                check = check_guest(vm.workload, guest)   # served by the successor monitor
                raise ParkError(f"{err}; the park was called off and the VM ran on where it "
                                f"was: {check.describe()}") from err
            out["checksums"] = len(guest["checksums"])
            return out
        finally:
            if vm.machine.running and not vm.machine.stopping:
                vm.shutdown()
            ctl.close()   # parked: releases everything; otherwise swaps in and stops


def _park(args: argparse.Namespace) -> dict[str, Any]:
    if args.source_dir is not None:
        return park_directory(args.source_dir, args.url, working_set=args.working_set)
    if args.swapped:
        return _park_swapped(args)
    work = tempfile.mkdtemp(prefix="vmmswap-park-")
    snapped_ok = False
    try:
        t0 = time.monotonic()
        with MicroVM(args.memory * MIB, vcpus=args.vcpus, regions=args.regions) as vm:
            vm.start()
            guest = prepare_guest(vm.workload, written_fraction=args.written)
            info = snapshot_micro_vm(vm, work, guest=guest)
            snapped_ok = True
            vm.shutdown()
        snapped = time.monotonic() - t0
        try:
            out = park_directory(work, args.url, working_set=args.working_set)
        except _ERRORS as err:
            # The VM is stopped: the snapshot on disk is now its only copy. Keep it.
            raise ParkError(f"{err}; the snapshot is kept in {work}: park it with "
                            f"`vmmswap park {args.url} --from {work}`") from err
        out.update(snapshot_seconds=round(snapped, 3), pause_ms=round(info.pause_s * 1000, 2),
                   checksums=len(guest["checksums"]))
        shutil.rmtree(work, ignore_errors=True)   # parked: nothing of the VM stays here
        return out
    except BaseException:
        if not snapped_ok:
            shutil.rmtree(work, ignore_errors=True)   # no snapshot yet: nothing to keep
        raise


def _resume(args: argparse.Namespace) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="vmmswap-resume-")
    child: subprocess.Popen[str] | None = None
    try:
        state, ws = fetch_state(args.url, work)
        if args.no_working_set:
            ws = None
        sock = os.path.join(work, "handler.sock")
        child = start_handler(None, sock, mem_url=args.url, cache_dir=args.cache_dir,
                              cache_mib=args.cache_mib, working_set=ws)
        out: dict[str, Any] = {"url": args.url, "working_set": ws is not None}
        with RestoredVM(state, handler_socket=sock) as vm:
            out.update(vm.start_and_check(args.timeout)[0])
            vm.shutdown()
        out["handler"] = handler_stats(child)
        child = None
        return out
    finally:
        if child is not None:
            stop_handler(child)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str], command: str = "park") -> int:
    parser = argparse.ArgumentParser(prog=f"vmmswap {command}")
    if command == "park":
        parser.add_argument("where", nargs="+", metavar="[SOCKET] URL",
                            help="the store: s3://bucket/prefix (AWS_* variables or a profile) "
                                 "or a directory; with SOCKET first, park the VM whose VMM "
                                 "listens there (`vmmswap run --vmm-socket`)")
    else:
        parser.add_argument("url", metavar="URL",
                            help="s3://bucket/prefix (AWS_* variables or a profile) or a "
                                 "directory")
    if command == "park":
        parser.description = ("Park a running VM (SOCKET URL: its VMM reads its memory where "
                              "it lies, swapped out or not, and stops it), or snapshot the "
                              "built-in guest (or upload the snapshot in --from) into an object "
                              "store, then remove the local copy.")
        parser.add_argument("--from", dest="source_dir", metavar="DIR",
                            help="park this snapshot directory instead of a fresh guest")
        parser.add_argument("--working-set", metavar="FILE",
                            help="a recorded working set to park with it (prefetched on resume)")
        parser.add_argument("--memory", type=int, default=256, metavar="MIB")
        parser.add_argument("--vcpus", type=int, default=2)
        parser.add_argument("--regions", type=int, choices=(1, 2), default=2)
        parser.add_argument("--written", type=float, default=0.5, metavar="FRACTION")
        parser.add_argument("--swapped", action="store_true",
                            help="run the guest under vmm-swap, swap its memory out, and park "
                                 "it from staging and the swap file (nothing comes back into "
                                 "RAM)")
        parser.add_argument("--swap-dir", metavar="DIR",
                            help="the swap file's directory with --swapped (default: the temp "
                                 "dir)")
        parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    else:
        parser.description = ("Resume a parked VM lazily from the store and have the guest "
                              "verify every checksum.")
        parser.add_argument("--cache-dir", metavar="DIR",
                            help="this host's chunk cache (default: none, every chunk fetched)")
        parser.add_argument("--cache-mib", type=int, default=1024)
        parser.add_argument("--no-working-set", action="store_true",
                            help="do not prefetch the parked working set")
        parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    args.socket = None
    if command == "park":
        if len(args.where) > 2:
            parser.error("give URL, or SOCKET URL")
        args.socket, args.url = (None, *args.where) if len(args.where) == 1 else args.where
        if args.socket is not None:
            return _park_socket(args.socket, args.url)
    if command == "park" and not 0 < args.written <= 1:
        parser.error("--written must be in (0, 1]")
    if command == "park" and args.swapped and args.source_dir is not None:
        parser.error("--swapped parks a running guest: it cannot be combined with --from")
    if command == "resume" and args.cache_mib <= 0:
        parser.error("--cache-mib must be positive")
    try:
        out = _park(args) if command == "park" else _resume(args)
    except _ERRORS as err:
        print(f"vmmswap {command}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    if command == "resume" and not out.get("ok"):
        print(f"vmmswap resume: the guest's check failed: {out.get('check')}", file=sys.stderr)
        return 1
    return 0


def resume_main(argv: list[str]) -> int:
    return main(argv, "resume")


__all__ = ["fetch_state", "main", "park_directory", "resume_main"]
