"""Test side of the data-plane tests: spawn the agent ("VMM") and serve its faults.

The parent never touches guest memory; it runs the :class:`PageHandler` and answers the child's
faults while waiting for the reply to a command. Every wait has a deadline: a fault nobody
serves fails the test instead of hanging it.
"""

from __future__ import annotations

import collections
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.uffd.errors import MappingChangingError
from vmmswap.uffd.events import PageFault, Remove
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import VMM_SWAP_FEATURES, Userfaultfd

AGENT = Path(__file__).with_name("agent.py")
DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE = 1 << 20


class UnexpectedFaultError(AssertionError):
    """The child faulted while the test said nothing should fault."""


@dataclass
class Guest:
    """Guest memory as the handler side sees it: specs, memfds and the child's uffd."""

    specs: list[RegionSpec]
    memfds: list[int]
    uffd: Userfaultfd

    def regions(self) -> list[tuple[RegionSpec, int]]:
        return list(zip(self.specs, self.memfds, strict=True))

    def register(self) -> None:
        for spec in self.specs:
            self.uffd.register(spec.host_addr, spec.size)

    def addr(self, region: int, page: int) -> int:
        """VMM address of page ``page`` of region ``region``."""
        return self.specs[region].host_addr + page * PAGE_SIZE

    def close(self) -> None:
        self.uffd.close()
        for fd in self.memfds:
            os.close(fd)


@dataclass
class FaultServer:
    """Serves a uffd's events with a handler and records them."""

    handler: PageHandler | None
    uffd: Userfaultfd
    faults: list[PageFault] = field(default_factory=list)
    removes: list[tuple[int, int]] = field(default_factory=list)
    changing_retries: int = 0

    def serve_ready(self) -> None:
        events = collections.deque(self.uffd.read_events())
        while events:
            event = events.popleft()
            if isinstance(event, Remove):
                self.removes.append((event.start, event.end))
                if self.handler is not None:
                    self.handler.handle_remove(event.start, event.end)
            elif isinstance(event, PageFault):
                self.faults.append(event)
                if self.handler is None:
                    raise UnexpectedFaultError(f"unexpected fault at {event.address:#x}")
                try:
                    self.handler.handle_page_fault(self.uffd, event.address, event.write)
                except MappingChangingError:
                    # Handle what is pending (REMOVE), then retry this fault.
                    self.changing_retries += 1
                    if self.changing_retries > 1000:
                        raise
                    self.faults.pop()
                    more = self.uffd.read_events()
                    events.extendleft(reversed([*more, event]))
            else:
                raise AssertionError(f"unexpected uffd event {event!r}")


class Vmm:
    """The agent child process."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = parent
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2] / "src")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, str(AGENT), str(child.fileno())],
                                     pass_fds=(child.fileno(),), env=env)
        child.close()
        self.guest: Guest | None = None

    def new_guest(self, layout: Sequence[tuple[int, int]], *, register: bool = True,
                  timeout: float = DEFAULT_TIMEOUT, backing: str = "4k") -> Guest:
        """Fresh guest memory (one memfd per ``(guest_addr, size)``) and uffd in the child;
        ``backing`` is a :class:`~vmmswap.dataplane.guest_memory.Backing` value."""
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        self.sock.send(json.dumps({"op": "new", "layout": [list(r) for r in layout],
                                   "backing": backing}).encode())
        self._wait_readable(timeout, None)
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 1 + len(layout),
                                                 socket.MSG_CMSG_CLOEXEC)
        reply = json.loads(msg)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"agent: {reply['error']}")
        uffd = Userfaultfd.from_raw_descriptor(fds[0], VMM_SWAP_FEATURES)
        for fd in fds:
            os.set_inheritable(fd, False)
        specs = [RegionSpec(g, h, s) for g, h, s in reply["regions"]]
        self.guest = Guest(specs, list(fds[1:]), uffd)
        if register:
            self.guest.register()
        return self.guest

    def _wait_readable(self, timeout: float, server: FaultServer | None,
                       uffd: Userfaultfd | None = None) -> None:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        watch = uffd if uffd is not None else (server.uffd if server is not None else None)
        if watch is not None:
            poller.register(watch.fileno(), select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise TimeoutError("the agent did not answer in time (an unserved fault?)")
            ready = dict(poller.poll(remaining * 1000))
            if watch is not None and watch.fileno() in ready:
                if server is None:
                    self.kill()
                    raise UnexpectedFaultError("the agent faulted and nothing serves it")
                server.serve_ready()
                continue
            if self.sock.fileno() in ready:
                return

    def request(self, cmd: dict[str, Any], server: FaultServer | None = None, *,
                timeout: float = DEFAULT_TIMEOUT, watch: bool = True) -> dict[str, Any]:
        """Send a command; serve faults with ``server`` until the reply arrives.

        Without a server, any uffd event while waiting fails with UnexpectedFaultError --
        unless ``watch`` is False (someone else, e.g. a C handler, serves the uffd).
        """
        self.sock.send(json.dumps(cmd).encode())
        uffd = self.guest.uffd if self.guest is not None and watch else None
        self._wait_readable(timeout, server, uffd)
        reply: dict[str, Any] = json.loads(self.sock.recv(MAX_MESSAGE))
        if "error" in reply:
            raise RuntimeError(f"agent: {reply['error']}")
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.sock.send(b'{"op": "exit"}')
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        self.sock.close()

    def __enter__(self) -> Vmm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
