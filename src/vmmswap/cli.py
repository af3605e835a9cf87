"""``vmmswap``: control a VM's vmm-swap from the command line, like ``crosvm swap``.

    vmmswap enable SOCKET
    vmmswap trim [--wait] SOCKET
    vmmswap out [--wait] SOCKET
    vmmswap disable [--slow-file-cleanup] [--drop-file] [--wait] SOCKET
    vmmswap status [--watch [SECONDS]] [--format json|prometheus] [--output FILE] SOCKET
    vmmswap demo [...]            (the micro-VM demo; --linux or --guest memtest86+ for others)
    vmmswap serve-snapshot [...]  (a Firecracker-compatible page-fault handler)
    vmmswap snapshot DIR [...]    (snapshot the built-in guest: state + Firecracker memory file)
    vmmswap restore DIR [...]     (restore it lazily through a handler, or eagerly; verify)
    vmmswap store put|get|info    (snapshot memory in an S3-compatible object store)
    vmmswap park URL [...]        (snapshot the built-in guest into the store, drop it here)
    vmmswap resume URL [...]      (restore it lazily from the store on any host; verify)

Exit codes: 0 success; 1 the command was refused or failed (wrong state, move or swap-out
failed); 2 usage error or a request the monitor did not understand; 3 the monitor cannot be
reached (no such socket, permission denied, monitor gone).
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final, TextIO

from vmmswap.control.prometheus import render as render_prometheus
from vmmswap.control.prometheus import write_textfile
from vmmswap.control.protocol import (
    Command,
    ErrorKind,
    ProtocolError,
    Request,
    Response,
    request,
)
from vmmswap.control.status import SwapState, SwapStatus
from vmmswap.uffd.pagesize import PAGE_SIZE

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3

_MIB: Final = 1024 * 1024
#: Per request. ``enable`` answers when the whole move is done: ~3 GB/s here, so even a large
#: guest answers well within it; a monitor that does not is stuck, and the user should know.
DEFAULT_TIMEOUT: Final = 120.0

#: What a waited-for command is waiting out, and the state it should end in.
_WAITS: Final[dict[Command, tuple[SwapState, SwapState]]] = {
    Command.TRIM: (SwapState.TRIM_IN_PROGRESS, SwapState.PENDING),
    Command.OUT: (SwapState.SWAP_OUT_IN_PROGRESS, SwapState.ACTIVE),
    Command.DISABLE: (SwapState.SWAP_IN_IN_PROGRESS, SwapState.READY),
}


class UnreachableError(Exception):
    """The monitor cannot be reached."""


class Client:
    """One connection to a monitor's control socket."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise UnreachableError(f"{path}: no such control socket (is the VM running with "
                              "a control socket?)") from None
        except PermissionError:
            self.sock.close()
            raise UnreachableError(f"{path}: permission denied (the socket is 0600: run as the "
                              "VM's user)") from None
        except OSError as err:
            self.sock.close()
            raise UnreachableError(f"{path}: cannot connect: {err.strerror or err}") from None

    def send(self, req: Request) -> Response:
        try:
            return request(self.sock, req)
        except ConnectionError as err:
            raise UnreachableError(f"{self.path}: {err}") from None

    def close(self) -> None:
        self.sock.close()


def _exit_code(response: Response) -> int:
    if response.ok:
        return EXIT_OK
    if response.error in (ErrorKind.REQUEST,):
        return EXIT_USAGE
    if response.error is ErrorKind.PERMISSION:
        return EXIT_UNREACHABLE
    return EXIT_FAILED


# --- human output -------------------------------------------------------------------------------
def _mib_of(pages: int, page_size: int = PAGE_SIZE) -> str:
    """Pages of the guest's page size (2 MiB on hugetlbfs) in MiB."""
    return f"{pages * page_size / _MIB:.1f} MiB"


def status_table(status: SwapStatus) -> str:
    """A human-readable rendering of a status, for ``status --watch``."""
    m, t = status.metrics, status.state_transition
    ps = m.page_size

    def _mib(pages: int) -> str:
        return _mib_of(pages, ps)

    rows = [
        ("state", str(status.state)),
        ("page size", f"{ps // 1024} KiB"),
        ("last transition", f"{t.pages} pages ({_mib(t.pages)}) in {t.time_ms} ms"),
        ("resident", f"{m.resident_pages} pages ({_mib(m.resident_pages)})"),
        ("staging", f"{m.staging_pages} pages ({_mib(m.staging_pages)})"),
        ("swap file", f"{m.swap_pages} pages ({_mib(m.swap_pages)})"),
        ("faults from staging", str(m.copied_from_staging_pages)),
        ("faults from file", str(m.copied_from_file_pages)),
        ("zero-filled faults", str(m.zeroed_pages)),
        ("redundant faults", str(m.redundant_pages)),
        ("readahead pages", str(m.readahead_pages)),
        ("faults avoided", str(m.faults_avoided)),
        ("device processes", str(status.devices)),
        ("monitor restarts", str(status.restarts) + (
            f" (last resumed in {status.last_resume_seconds * 1000:.0f} ms)"
            if status.restarts else "")),
    ]
    if status.error:
        rows.append(("error", status.error))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def progress_line(command: Command, status: SwapStatus) -> str:
    """One line of progress for a running trim / out / disable."""
    m, t = status.metrics, status.state_transition

    def _mib(pages: int) -> str:
        return _mib_of(pages, m.page_size)

    if command is Command.TRIM:  # trim visits staging; what is left to visit is not reported
        return f"trim: {t.pages} pages trimmed ({_mib(t.pages)}) after {t.time_ms / 1000:.1f} s"
    if command is Command.OUT:
        left = m.staging_pages
        verb = "written"
    else:
        left = m.staging_pages + m.swap_pages
        verb = "swapped in"
    total = t.pages + left
    pct = 100.0 * t.pages / total if total else 100.0
    return (f"{command}: {t.pages} pages {verb} ({_mib(t.pages)}), {left} left, "
            f"{pct:5.1f}% after {t.time_ms / 1000:.1f} s")


def _wait(client: Client, command: Command, out: TextIO, interval: float = 0.2) -> int:
    running, target = _WAITS[command]
    tty = out.isatty()
    last_print = 0.0
    while True:
        response = client.send(Request(Command.STATUS))
        if not response.ok or response.status is None:
            print(f"vmmswap: status failed: {response.message}", file=sys.stderr)
            return _exit_code(response) or EXIT_FAILED
        status = response.status
        now = time.monotonic()
        if status.state is not running:
            if tty:
                out.write("\r\033[K")
            print(progress_line(command, status).replace(", 0 left", ""), file=out)
            if status.state is target:
                return EXIT_OK
            print(f"vmmswap: {command} ended in state {status.state}"
                  + (f": {status.error}" if status.error else ""), file=sys.stderr)
            return EXIT_FAILED
        if tty:
            out.write("\r\033[K" + progress_line(command, status))
            out.flush()
        elif now - last_print >= 1.0:
            print(progress_line(command, status), file=out, flush=True)
            last_print = now
        time.sleep(interval)


def _watch(client: Client, interval: float, out: TextIO) -> int:
    tty = out.isatty()
    try:
        while True:
            response = client.send(Request(Command.STATUS))
            if not response.ok or response.status is None:
                print(f"vmmswap: {response.message}", file=sys.stderr)
                return _exit_code(response) or EXIT_FAILED
            if tty:
                out.write("\033[H\033[2J")
            print(time.strftime("%H:%M:%S"), client.path, file=out)
            print(status_table(response.status), file=out, flush=True)
            if not tty:
                print(file=out)
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _print_status(status: SwapStatus, fmt: str, output: str | None, out: TextIO) -> int:
    text = render_prometheus(status) if fmt == "prometheus" else status.to_json() + "\n"
    if output is None:
        out.write(text)
        return EXIT_OK
    try:
        write_textfile(output, text)
    except OSError as err:
        print(f"vmmswap status: cannot write {output}: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --- entry point --------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmmswap", description="Control vmm-swap of a running VM through its control "
        "socket (like `crosvm swap`).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("socket", metavar="SOCKET", help="the VM's vmm-swap control socket")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="give up when the monitor does not answer a request within SECONDS "
                       f"(default {DEFAULT_TIMEOUT:g}; 0 waits for ever)")
        return p

    add("enable", "Enable vmm-swap of a VM. The guest memory is moved to staging memory.")
    for name, text in (("trim", "Trim pages in the staging memory."),
                       ("out", "Swap out staging memory to the swap file.")):
        add(name, text).add_argument("--wait", action="store_true",
                                     help="wait until it is done, showing progress")
    p = add("disable", "Disable vmm-swap of a VM: swap every page back in.")
    p.add_argument("--slow-file-cleanup", action="store_true",
                   help="clean up the swap file in the background")
    p.add_argument("--drop-file", action="store_true",
                   help="with dirty tracking: do not keep the swap file's copies for the next "
                   "enable (in Ready: drop a kept file now)")
    p.add_argument("--wait", action="store_true", help="wait until every page is back")
    p = add("status", "Get vmm-swap status of a VM (JSON, one line).")
    p.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
                   help="refresh a human-readable table every SECONDS (default 1)")
    p.add_argument("--format", choices=("json", "prometheus"), default="json",
                   help="json: crosvm's one line (default); prometheus: the text exposition "
                   "format (vmmswap_ metrics in base units)")
    p.add_argument("--output", metavar="FILE",
                   help="write to FILE atomically instead of stdout (for a node exporter's "
                   "textfile collector)")
    sub.add_parser("demo", help="run the micro-VM demo (--linux / --guest memtest86+: "
                   "boot that guest)",
                   add_help=False)
    sub.add_parser("serve-snapshot", add_help=False, help="serve a snapshot's memory to a "
                   "VMM (Firecracker's page-fault handler handshake)")
    sub.add_parser("snapshot", add_help=False, help="run the built-in guest and snapshot it "
                   "(DIR/vmstate.json + DIR/memory)")
    sub.add_parser("restore", add_help=False, help="restore a snapshot lazily (through a "
                   "page-fault handler) or eagerly and verify the guest's checksums")
    sub.add_parser("store", add_help=False, help="snapshot memory in an object store "
                   "(put, get, info)")
    sub.add_parser("park", add_help=False, help="park a running VM (SOCKET URL) or the "
                   "built-in guest (URL) into an object store")
    sub.add_parser("resume", add_help=False, help="restore a parked VM lazily from the store "
                   "and verify the guest's checksums")
    sub.add_parser("run", add_help=False, help="run the built-in guest under vmm-swap until "
                   "it is parked (vmmswap park VMM_SOCKET URL) or stopped")
    return parser


#: ``vmmswap demo --guest NAME``: the module whose ``main(argv)`` runs that guest's demo.
_DEMO_GUESTS = {"micro": "vmmswap.vm.demo", "linux": "vmmswap.vm.linux.demo",
                "memtest86+": "vmmswap.vm.memtest.demo"}


def _demo_guest(argv: list[str]) -> tuple[str | None, list[str]]:
    """The ``--guest`` value (``--linux`` means linux) and argv without it."""
    rest: list[str] = []
    guest: str | None = None
    args = iter(argv)
    for arg in args:
        if arg == "--linux":
            guest = "linux"
        elif arg == "--guest":
            guest = next(args, "")
        elif arg.startswith("--guest="):
            guest = arg.removeprefix("--guest=")
        else:
            rest.append(arg)
    return guest, rest


def _demo(argv: list[str]) -> int:
    guest, argv = _demo_guest(argv)
    module_name = _DEMO_GUESTS.get(guest if guest is not None else "micro")
    if module_name is None:
        print(f"vmmswap demo: unknown --guest {guest!r} (one of {', '.join(_DEMO_GUESTS)})",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        module = importlib.import_module(module_name)
        entry: Callable[[list[str]], int | None] = module.main
    except (ImportError, AttributeError) as err:
        print(f"vmmswap demo: {module_name} is not available: {err}", file=sys.stderr)
        return EXIT_USAGE
    return int(entry(argv) or 0)


#: Snapshot subcommands, each the ``main(argv)`` of its own module.
_SNAPSHOT_COMMANDS = {"serve-snapshot": "vmmswap.snapshot.serve",
                      "snapshot": "vmmswap.vm.snapshot_cli",
                      "restore": "vmmswap.vm.restore_cli",
                      "store": "vmmswap.storage.commands",
                      "park": "vmmswap.vm.park",
                      "resume": "vmmswap.vm.park:resume_main",
                      "run": "vmmswap.vm.run_cli"}


def _snapshot_command(name: str, argv: list[str]) -> int:
    module_name, _, entry = _SNAPSHOT_COMMANDS[name].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, entry or "main")(argv) or 0)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    if args_list and args_list[0] == "demo":
        return _demo(args_list[1:])
    if args_list and args_list[0] in _SNAPSHOT_COMMANDS:
        return _snapshot_command(args_list[0], args_list[1:])
    try:
        args = _parser().parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    command = Command(args.command)
    try:
        client = Client(args.socket, args.timeout if args.timeout > 0 else None)
    except UnreachableError as err:
        print(f"vmmswap: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        if command is Command.STATUS and args.watch is not None:
            return _watch(client, max(0.05, args.watch), out)
        req = Request(command, getattr(args, "slow_file_cleanup", False),
                      getattr(args, "drop_file", False))
        response = client.send(req)
        if command is Command.STATUS and response.ok and response.status is not None:
            return _print_status(response.status, args.format, args.output, out)
        if not response.ok:
            state = f" (state {response.status.state})" if response.status else ""
            print(f"vmmswap {command}: {response.message}{state}", file=sys.stderr)
            return _exit_code(response)
        if getattr(args, "wait", False):
            return _wait(client, command, out)
        if command is Command.ENABLE and response.status is not None:
            t = response.status.state_transition
            ps = response.status.metrics.page_size
            print(f"enabled: {t.pages} pages ({_mib_of(t.pages, ps)}) moved to staging in "
                  f"{t.time_ms} ms", file=out)
        else:
            state = response.status.state if response.status else "?"
            print(f"{command}: accepted (state {state})", file=out)
        return EXIT_OK
    except UnreachableError as err:
        print(f"vmmswap: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TimeoutError:
        print(f"vmmswap: {args.socket}: the monitor did not answer within {args.timeout:g} s "
              "(see --timeout)", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ProtocolError, OSError) as err:
        print(f"vmmswap: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE if isinstance(err, OSError) else EXIT_USAGE
    finally:
        client.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
