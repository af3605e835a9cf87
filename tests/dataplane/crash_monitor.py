"""The monitor of the crash tests: a fork server whose children run one operation and die.

Run as ``python crash_monitor.py FD`` (FD: a SOCK_SEQPACKET socket to the test). The server
imports the data plane once; for each request (JSON plus descriptors: the guest's uffd, the
page state, staging, the swap file, a stop pipe and the region memfds) it forks a child, which
resumes a handler over the descriptors (:meth:`PageHandler.resume`: it is itself a successor),
installs a crash-point hook (:func:`vmmswap.dataplane.crash_points.set_hook`) that SIGKILLs it at
the ``kill_at``-th point it passes, and runs the operation. The server then reports the child's
end. Forking a single-threaded server costs milliseconds where a fresh interpreter costs 250 ms,
which is what lets the test try hundreds of kill points.

Messages to the test: ``{"pid": n}`` after the fork; from the child ``{"killed_at": name}``
just before it kills itself, or ``{"done": true, "hits": n}``; ``{"exit": status}`` once reaped.
"""

from __future__ import annotations

import collections
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from vmmswap.dataplane import crash_points, move
from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.dataplane.page_state import PageState
from vmmswap.kernel import libc
from vmmswap.uffd.errors import MappingChangingError
from vmmswap.uffd.events import PageFault, Remove
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import VMM_SWAP_FEATURES, Userfaultfd

MAX_MESSAGE = 1 << 16


def _serve(handler: PageHandler, uffd: Userfaultfd, stop_fd: int,
           work: Iterator[None] | None = None) -> None:
    """Serve faults and REMOVE events until the stop pipe is closed (or 20 s pass idle);
    between rounds without events, run one step of ``work`` (as the monitor does)."""
    poller = select.poll()
    poller.register(uffd.fileno(), select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    stopped = False
    while True:
        ready = dict(poller.poll(0 if work is not None else 20_000))
        if stop_fd in ready:
            stopped = True
            poller.unregister(stop_fd)
        if uffd.fileno() not in ready:
            if work is not None:
                if next(work, StopIteration) is StopIteration:
                    work = None
                continue
            if stopped or not ready:
                return
            continue
        events = collections.deque(uffd.read_events())
        while events:
            event = events.popleft()
            if isinstance(event, Remove):
                crash_points.crash_point("serve.remove_read")
                handler.handle_remove(event.start, event.end)
            elif isinstance(event, PageFault):
                crash_points.crash_point("serve.fault_read")
                try:
                    handler.handle_page_fault(uffd, event.address, event.write)
                except MappingChangingError:
                    events.extendleft(reversed([*uffd.read_events(), event]))


def _mixed_work(handler: PageHandler, uffd: Userfaultfd, step: int) -> Iterator[None]:
    """Swap-out chunks, a trim, then a swap-in, a step at a time (faults served between)."""
    while handler.swap_out(step * PAGE_SIZE) > 0:
        yield
    trim = handler.start_trim()
    while trim.trim_pages(step) is not None:
        yield
    swap_in = handler.start_swap_in()
    while swap_in.swap_in(uffd, step * PAGE_SIZE) > 0:
        yield


def _child(cfg: dict[str, Any], fds: list[int], sock: socket.socket) -> None:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    uffd_fd, state_fd, staging_fd, swap_fd, stop_fd, *memfds = fds
    uffd = Userfaultfd.from_raw_descriptor(uffd_fd, VMM_SWAP_FEATURES)
    specs = [RegionSpec(*r) for r in cfg["regions"]]
    move.MARK_AFTER_PUNCH = bool(cfg.get("wrong_order"))
    kill_at = int(cfg["kill_at"])
    hits: list[str] = []

    def hook(name: str) -> None:
        hits.append(name)
        if len(hits) - 1 == kill_at:
            sock.send(json.dumps({"killed_at": name}).encode())
            os.kill(os.getpid(), signal.SIGKILL)

    handler = PageHandler.resume(list(zip(specs, memfds, strict=True)), swap_file=swap_fd,
                                 state=PageState.attach(state_fd), staging_fd=staging_fd,
                                 readahead=bool(cfg.get("readahead", True)),
                                 workers=int(cfg.get("workers", 2)))
    crash_points.set_hook(hook)
    if cfg.get("map_staging"):
        handler.staging.view()  # as after a prepared enable: swap-out writes from the mapping
    op = cfg["op"]
    step = int(cfg.get("step_pages", 4))
    if op == "move":
        # As the monitor's enable does: staging prepared first (a kill there leaves only
        # populated pages with clear bits, a successor's sweep frees them).
        if cfg.get("prepare", True):
            handler.prepare_move()
        handler.move_to_staging()
    elif op == "out":
        while handler.swap_out(step * PAGE_SIZE) > 0:
            pass
    elif op == "trim":
        ctx = handler.start_trim()
        while ctx.trim_pages(step) is not None:
            pass
    elif op == "swapin":
        swap_in = handler.start_swap_in()
        while swap_in.swap_in(uffd, step * PAGE_SIZE) > 0:
            pass
    elif op == "serve":
        _serve(handler, uffd, stop_fd)
    elif op == "mixed":
        _serve(handler, uffd, stop_fd, _mixed_work(handler, uffd, step))
    else:
        raise ValueError(f"unknown op {op}")
    sock.send(json.dumps({"done": True, "hits": len(hits), "names": hits}).encode())
    # Exit like a killed monitor would: no close, no flush of deferred punches.
    os._exit(0)


def main() -> None:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        sys.exit(1)
    sock = socket.socket(fileno=int(sys.argv[1]))
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 64)
        if not msg:
            return
        cfg = json.loads(msg)
        if cfg.get("op") == "exit":
            return
        pid = os.fork()
        if pid == 0:
            try:
                _child(cfg, fds, sock)
            except BaseException as err:
                try:
                    sock.send(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
                finally:
                    os._exit(3)
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"pid": pid}).encode())
        _, status = os.waitpid(pid, 0)
        sock.send(json.dumps({"exit": status}).encode())


if __name__ == "__main__":
    main()
