"""Helpers for the userfaultfd tests: forked peers, a monitor loop, memory types, the C probe.

The GIL rule shapes everything here: memory registered with a uffd is only touched by a process
or thread that is not the one serving it while holding the GIL. A test either forks a *peer*
(the registered process, which touches its memory with ctypes calls or the C probe) and serves
its faults from the test process, or runs a whole scenario in a forked child with a handler
thread. Every wait has a deadline; a peer that overstays it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmmswap.kernel import libc
from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.events import Event
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, bytes_to_pages, pages_to_bytes
from vmmswap.uffd.userfaultfd import Userfaultfd

HERE = Path(__file__).resolve().parent
MSG_MAX = 1 << 16
DEFAULT_TIMEOUT = 20.0
NO_FEATURES = Feature(0)


# --- feature gating ----------------------------------------------------------------------------
_SUPPORT: Feature | None = None


def supported_features() -> Feature:
    global _SUPPORT
    if _SUPPORT is None:
        _SUPPORT = Userfaultfd.probe().features
    return _SUPPORT


def require(features: Feature) -> None:
    """Skip the test unless the kernel has every feature in ``features`` (the selftests' rule)."""
    missing = Feature(int(features) & ~int(supported_features()))
    if missing:
        pytest.skip(f"kernel lacks {missing!r}")


# --- memory types (the selftests' anon / shmem / shmem-private) -------------------------------
@dataclass
class Area:
    """A test area: ``mapping`` is registered; ``alias`` (shmem only) maps the same pages."""

    kind: str
    mapping: Mapping
    alias: Mapping | None
    memfd: int | None

    @property
    def address(self) -> int:
        return self.mapping.address

    @property
    def length(self) -> int:
        return self.mapping.length

    def page(self, index: int) -> int:
        return self.mapping.address + pages_to_bytes(index)

    def close(self) -> None:
        self.mapping.close()
        if self.alias is not None:
            self.alias.close()
        if self.memfd is not None:
            os.close(self.memfd)


#: Areas stay referenced until the process ends: a peer's mappings must not be unmapped by the
#: garbage collector when its function returns (with EVENT_UNMAP that munmap would block until
#: a monitor that has stopped listening reads the event).
_KEEP_ALIVE: list[object] = []


def keep_alive(obj: Any) -> Any:
    _KEEP_ALIVE.append(obj)
    return obj


def make_area(kind: str, pages: int) -> Area:
    length = pages_to_bytes(pages)
    if kind == "anon":
        return keep_alive(Area(kind, Mapping.anonymous(length), None, None))  # type: ignore[no-any-return]
    memfd = os.memfd_create(f"uffd-test-{kind}", os.MFD_CLOEXEC)
    os.ftruncate(memfd, length)
    if kind == "shmem":
        area = Area(kind, Mapping.map_fd(memfd, length), Mapping.map_fd(memfd, length), memfd)
    elif kind == "shmem-private":
        area = Area(kind, Mapping.map_fd(memfd, length, shared=False), None, memfd)
    else:
        raise ValueError(kind)
    return keep_alive(area)  # type: ignore[no-any-return]


# --- the C probe (SIGBUS-proof memory access) --------------------------------------------------
@dataclass
class Probe:
    lib: ctypes.CDLL

    def read(self, addr: int, pages: int) -> tuple[int, list[int]]:
        """(SIGBUS count, per page: byte value if uniform, -1 SIGBUS, -2 mixed)."""
        out = (ctypes.c_int * pages)()
        count = self.lib.probe_pages(ctypes.c_void_p(addr), pages, PAGE_SIZE, out)
        return int(count), list(out)

    def write(self, addr: int, pages: int, value: int) -> int:
        return int(self.lib.write_pages(ctypes.c_void_p(addr), pages, PAGE_SIZE, value))


def build_probe(out_dir: Path) -> Probe:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("gcc is needed to build the SIGBUS probe")
    lib = out_dir / "uffd_probe.so"
    subprocess.run([gcc, "-O1", "-shared", "-fPIC", "-Wall", "-o", str(lib),
                    str(HERE / "probe.c")], check=True)
    cdll = ctypes.CDLL(str(lib))  # CDLL: the GIL is released during every call
    cdll.probe_pages.restype = ctypes.c_long
    cdll.probe_pages.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                                 ctypes.POINTER(ctypes.c_int)]
    cdll.write_pages.restype = ctypes.c_long
    cdll.write_pages.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    return Probe(cdll)


# --- touching registered memory (GIL released) ---------------------------------------------------
def read_bytes(addr: int, length: int) -> bytes:
    """Copy out of (possibly registered) memory with ctypes.memmove: the GIL is released."""
    buf = ctypes.create_string_buffer(length)
    ctypes.memmove(buf, addr, length)
    return buf.raw


def write_bytes(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, data, len(data))


def pagemap_entry(addr: int) -> int:
    """This process's /proc/self/pagemap entry for the page at ``addr``."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(bytes_to_pages(addr) * 8)
        return int.from_bytes(f.read(8), "little")


# --- messages over a SOCK_SEQPACKET pair -------------------------------------------------------
def send_msg(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv_msg(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> tuple[Any, list[int]]:
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        raise TimeoutError("no message from the peer in time")
    data, fds, _, _ = socket.recv_fds(sock, MSG_MAX, 8, socket.MSG_CMSG_CLOEXEC)
    if not data:
        raise EOFError("the peer closed the channel")
    return pickle.loads(data), list(fds)


class Peer:
    """A forked child running ``target(sock)``; the test talks to it over ``self.sock``.

    The child exits 0 when ``target`` returns, 1 with its traceback on stderr when it raises;
    it never returns into pytest.
    """

    def __init__(self, target: Callable[[socket.socket], None],
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                parent.close()
                target(child)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self.sock = parent
        self.deadline = time.monotonic() + timeout
        self.status: int | None = None

    def recv(self) -> tuple[Any, list[int]]:
        return recv_msg(self.sock, max(0.0, self.deadline - time.monotonic()))

    def send(self, obj: Any) -> None:
        send_msg(self.sock, obj)

    def recv_uffd(self, features: Feature = NO_FEATURES) -> tuple[Userfaultfd, Any]:
        payload, fds = self.recv()
        assert len(fds) == 1, f"expected one descriptor, got {fds}"
        return Userfaultfd.from_raw_descriptor(fds[0], features), payload

    def wait(self) -> int:
        """Wait for the child (killing it at the deadline); returns its exit code."""
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                break
            if time.monotonic() > self.deadline:
                self.kill()
                pytest.fail("the peer process did not finish in time (killed)")
            time.sleep(0.005)
        self.sock.close()
        return os.waitstatus_to_exitcode(self.status)

    def check(self) -> None:
        code = self.wait()
        assert code == 0, f"peer failed with exit code {code} (its traceback is in stderr)"

    def kill(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _, self.status = os.waitpid(self.pid, 0)


def serve(uffds: list[Userfaultfd], handle: Callable[[Userfaultfd, Event], None],
          peer: Peer, done: Callable[[], bool] | None = None) -> Any:
    """Serve every uffd in ``uffds`` (the list may grow) until the peer sends a message.

    Returns that message. ``handle`` gets each event; a peer that dies first fails the test.
    """
    while True:
        if done is not None and done():
            return None
        remaining = peer.deadline - time.monotonic()
        if remaining <= 0:
            peer.kill()
            pytest.fail("the peer did not finish in time (killed)")
        poller = select.poll()
        for u in uffds:
            poller.register(u.fileno(), select.POLLIN)
        poller.register(peer.sock.fileno(), select.POLLIN)
        ready = {fd for fd, _ in poller.poll(min(remaining, 0.2) * 1000)}
        for u in list(uffds):
            if u.fileno() in ready:
                for event in u.read_events():
                    handle(u, event)
        if peer.sock.fileno() in ready and not any(u.fileno() in ready for u in uffds):
            return peer.recv()[0]


def run_in_child(fn: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Run ``fn`` in a forked child (which may fault, start threads, die); return its result.

    An exception in the child fails the test with the child's traceback; a child that overstays
    ``timeout`` is killed.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            try:
                result: tuple[str, Any] = ("ok", fn())
            except BaseException as exc:
                result = ("error", "".join(traceback.format_exception(exc)))
            data = pickle.dumps(result)
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([r], [], [], max(0.0, remaining))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the child did not finish within {timeout} s (killed)")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        pytest.fail(f"the child died without a result (wait status {status:#x})")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        pytest.fail(f"the child failed:\n{value}")
    return value


@contextlib.contextmanager
def handler_thread(uffd: Userfaultfd,
                   handle: Callable[[Event], None]) -> Iterator[list[BaseException]]:
    """Serve ``uffd`` from a thread of this process until the block ends.

    Use only where this process touches the registered memory through GIL-releasing calls
    (ctypes), i.e. in a child from :func:`run_in_child`. Errors of ``handle`` are collected in
    the yielded list.
    """
    stop_r, stop_w = os.pipe()
    errors: list[BaseException] = []

    def loop() -> None:
        poller = select.poll()
        poller.register(uffd.fileno(), select.POLLIN)
        poller.register(stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if uffd.fileno() in ready:
                try:
                    for event in uffd.read_events():
                        handle(event)
                except BaseException as exc:
                    errors.append(exc)
                    return
            elif stop_r in ready:
                return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        os.write(stop_w, b"x")
        thread.join(5)
        os.close(stop_r)
        os.close(stop_w)
    if errors:
        raise errors[0]


def madvise(addr: int, length: int, advice: int) -> None:
    libc.madvise(addr, length, advice)


PM_PRESENT = 1 << 63


def is_present(addr: int) -> bool:
    return bool(pagemap_entry(addr) & PM_PRESENT)


def read_present(addr: int, length: int) -> bytes:
    """Read memory of *this* process that must already be populated.

    A missing registered page would block this thread forever (and no Python timeout can
    interrupt a fault), so every page is checked in /proc/self/pagemap first.
    """
    for offset in range(0, length, PAGE_SIZE):
        assert is_present(addr + offset), f"page {addr + offset:#x} is not populated"
    return read_bytes(addr, length)
