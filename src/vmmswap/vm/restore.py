"""Restore a micro-VM snapshot, lazily through a page-fault handler or eagerly from the file.

Lazy restore does exactly what Firecracker does on ``PUT /snapshot/load`` with a ``Uffd``
memory backend, so ``vmmswap serve-snapshot`` -- or any handler written for Firecracker --
serves it unchanged:

1. guest memory is mapped (one memfd per region, nothing in it) and registered with a new
   userfaultfd for MISSING faults, with UFFD_FEATURE_EVENT_REMOVE so a balloon inflation
   reaches the handler;
2. the VMM connects to the handler's Unix socket and sends one message: the JSON array of
   GuestRegionUffdMapping objects (:func:`~vmmswap.snapshot.handshake.send_handshake`, the
   same bytes a current Firecracker sends) with the uffd attached by SCM_RIGHTS;
3. vCPU and device state are loaded and the vCPUs run. Every page the guest touches faults
   inside KVM_RUN (GIL released) and is filled by the handler, another process.

The socket stays open for the VM's life; closing it tells the handler to exit. If the handler
goes away first (EOF, or an error reply to a refused handshake) the machine is stopped: its
faults could never be served.

**Safety**: after registration the VMM's Python code never touches guest memory -- as under
vmm-swap, the guest is driven through port I/O only. Eager restore (the baseline) copies the
memory file's data extents into the memfds with ``pread``/``pwrite`` (kernel copies) before
any vCPU runs; nothing is registered then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType
from typing import IO, Any, Final, Self

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.guest_memory import Backing, GuestMemory, data_ranges
from vmmswap.kernel.uffd import Feature
from vmmswap.snapshot.handshake import RegionMapping, send_handshake
from vmmswap.snapshot.working_set import load_working_set
from vmmswap.uffd.userfaultfd import Userfaultfd
from vmmswap.vm import guest_abi as abi
from vmmswap.vm.balloon import BalloonDevice
from vmmswap.vm.devices import DebugConsole
from vmmswap.vm.kvm import Kvm
from vmmswap.vm.layout import GuestLayout
from vmmswap.vm.machine import Machine
from vmmswap.vm.machine_state import restore_devices, restore_vcpu
from vmmswap.vm.snapshot import DIFF_FILE, DIFF_PAGES_FILE, GUEST_KIND, MEMORY_FILE
from vmmswap.vm.snapshot_check import CheckResult, check_guest
from vmmswap.vm.vm_state import VmState, VmStateError
from vmmswap.vm.workload import Workload, WorkloadDevice

_log = logging.getLogger(__name__)
_CHUNK: Final = 8 << 20
CONNECT_TIMEOUT_S: Final = 10.0


class RestoreError(RuntimeError):
    """The snapshot cannot be restored (handler unreachable, memory file too short, ...)."""


_UCRED: Final = struct.Struct("3i")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return int(uid)


def connect_handler(path: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """Connect to a handler's socket, waiting up to ``timeout`` for it to start listening.

    The handler gets the uffd, i.e. control of all guest memory: one run by another user is
    refused before anything is sent."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            uid = peer_uid(sock)
            if uid != os.getuid():
                sock.close()
                raise RestoreError(f"the handler at {path} runs as uid {uid}, not ours "
                                   f"({os.getuid()}): refusing to hand it guest memory")
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if time.monotonic() > deadline:
                raise RestoreError(f"no page-fault handler listening at {path} within "
                                   f"{timeout:g} s: {err.strerror}") from None
            time.sleep(0.01)
        except BaseException:
            sock.close()
            raise


def memory_files(directory: str, state: VmState) -> tuple[str, str | None, str | None]:
    """(memory file, diff file or None, diff page list or None) of a snapshot directory: a
    diff snapshot's own memory lies over its base's (named in its state file)."""
    base = state.guest.get("base")
    if base is None:
        return os.path.join(directory, MEMORY_FILE), None, None
    if not isinstance(base, str):
        raise VmStateError("the state file's base must be a directory path")
    return (os.path.join(base, MEMORY_FILE), os.path.join(directory, DIFF_FILE),
            os.path.join(directory, DIFF_PAGES_FILE))


def start_handler(mem_file: str | None, socket_path: str, *, working_set: str | None = None,
                  record: str | None = None, record_seconds: float | None = None,
                  overlay: str | None = None, overlay_pages: str | None = None,
                  mem_url: str | None = None, cache_dir: str | None = None,
                  cache_mib: int | None = None) -> subprocess.Popen[str]:
    """Start ``vmmswap serve-snapshot`` as a child process (its own interpreter: the process
    serving faults must never be the one whose threads take them -- the GIL rule). It prints
    one JSON line when listening and one with its counters when the VMM has gone. Memory comes
    from ``mem_file``, or from the object store at ``mem_url`` through ``cache_dir``."""
    if (mem_file is None) == (mem_url is None):
        raise ValueError("give exactly one of mem_file and mem_url")
    argv = [sys.executable, "-m", "vmmswap", "serve-snapshot", "--socket", socket_path]
    if mem_file is not None:
        argv += ["--mem-file", mem_file]
    else:
        assert mem_url is not None
        argv += ["--mem-url", mem_url]
        if cache_dir is not None:
            argv += ["--cache-dir", cache_dir]
        if cache_mib is not None:
            argv += ["--cache-mib", str(cache_mib)]
    if working_set is not None:
        argv += ["--working-set", working_set]
    if record is not None:
        argv += ["--record-working-set", record]
    if record_seconds is not None:
        argv += ["--record-seconds", str(record_seconds)]
    if overlay is not None and overlay_pages is not None:
        argv += ["--overlay", overlay, "--overlay-pages", overlay_pages]
    # Its log goes to an unnamed file, never to a pipe nobody reads until the end: a handler
    # that logs a retry per chunk while a store is down would fill a pipe and block in write,
    # with its fetch threads holding the logging lock -- the guest would never be served.
    err_file = tempfile.TemporaryFile("w+")  # noqa: SIM115 (kept open for the child's life)
    try:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err_file, text=True,
                                 close_fds=True)
    except BaseException:
        err_file.close()
        raise
    _HANDLER_LOGS[child.pid] = err_file
    assert child.stdout is not None
    line = child.stdout.readline()
    if '"listening"' not in line:
        child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.communicate(timeout=10)
        raise RestoreError(f"vmmswap serve-snapshot did not start: "
                           f"{_take_log(child).strip() or line}")
    return child


#: pid -> the unnamed file holding that handler child's stderr.
_HANDLER_LOGS: dict[int, IO[str]] = {}


def _take_log(child: subprocess.Popen[str]) -> str:
    f = _HANDLER_LOGS.pop(child.pid, None)
    if f is None:
        return ""
    with f:
        f.seek(0)
        return f.read()


def stop_handler(child: subprocess.Popen[str]) -> None:
    """Kill a handler child that is no longer wanted (the restore failed) and reap it."""
    child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.communicate(timeout=10)
    if child.returncode is not None:
        _take_log(child)


def handler_stats(child: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """Wait for a handler started by :func:`start_handler` to exit; its counters."""
    out, _ = child.communicate(timeout=timeout)
    err = _take_log(child)
    if child.returncode != 0:
        raise RestoreError(f"vmmswap serve-snapshot failed ({child.returncode}): "
                           f"{err.strip()}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    stats: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    return stats


def eager_load(memory: GuestMemory, state: VmState, mem_file: str,
               overlay: str | None = None, overlay_pages: str | None = None) -> int:
    """Copy the memory file's data into guest memory before anything runs -- then, for a diff
    snapshot, every page the diff lists (zeros where it is a hole); bytes copied."""
    copied = _copy_extents(memory, state, mem_file)
    if overlay is not None and overlay_pages is not None:
        pages = load_working_set(overlay_pages, file_pages=state.memory_size // 4096)
        fd = os.open(overlay, os.O_RDONLY | os.O_CLOEXEC)
        try:
            page = bytearray(4096)
            for file_page in pages.tolist():
                pos = file_page * 4096
                rs = next(r for r in state.regions
                          if r.file_offset <= pos < r.file_offset + r.size)
                region = memory.regions[state.regions.index(rs)]
                view = memoryview(page)
                if os.preadv(fd, [view], pos) != len(page):
                    raise RestoreError(f"short read of {overlay} at {pos:#x}")
                os.pwrite(region.memfd, view, pos - rs.file_offset)
                copied += len(page)
        finally:
            os.close(fd)
    return copied


def _copy_extents(memory: GuestMemory, state: VmState, mem_file: str) -> int:
    copied = 0
    fd = os.open(mem_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < state.memory_size:
            raise RestoreError(f"memory file {mem_file} is {size} bytes, the snapshot "
                               f"describes {state.memory_size}")
        buf = bytearray(_CHUNK)
        for region, rs in zip(memory.regions, state.regions, strict=True):
            for start, end in data_ranges(fd, rs.file_offset + rs.size, rs.file_offset):
                for pos in range(start, end, _CHUNK):
                    length = min(_CHUNK, end - pos)
                    view = memoryview(buf)[:length]
                    if os.preadv(fd, [view], pos) != length:
                        raise RestoreError(f"short read of {mem_file} at {pos:#x}")
                    os.pwrite(region.memfd, view, pos - rs.file_offset)
                    copied += length
    finally:
        os.close(fd)
    return copied


def hand_over(memory: GuestMemory, state: VmState, path: str, timeout: float = CONNECT_TIMEOUT_S
              ) -> tuple[Userfaultfd, socket.socket]:
    """Steps 1 and 2 of the module docstring: register ``memory`` with a new uffd, connect to
    the handler at ``path`` and send it Firecracker's handshake. The caller keeps both (the
    uffd keeps the registration alive; closing the socket ends the handler).

    **Safety**: the caller keeps ``memory`` mapped until after the uffd is closed, and from
    now on only the guest (KVM_RUN, GIL released) touches it; the handler serves it."""
    uffd = Userfaultfd.new(Feature.EVENT_REMOVE)
    try:
        mappings = []
        for region, rs in zip(memory.regions, state.regions, strict=True):
            uffd.register(region.host_addr, region.size)
            mappings.append(RegionMapping(region.host_addr, region.size, rs.file_offset,
                                          state.page_size))
        sock = connect_handler(path, timeout)
        try:
            send_handshake(sock, mappings, uffd.fileno())
        except BaseException:
            sock.close()
            raise
    except BaseException:
        uffd.close()
        raise
    return uffd, sock


class RestoredVM:
    """A micro-VM brought back from a snapshot; the same attributes as
    :class:`~vmmswap.vm.micro.MicroVM` (``memory``, ``machine``, ``device``, ``workload``,
    ``balloon``, ``console``, ``layout``) plus ``state`` (what was loaded) and ``t_created``
    (``time.monotonic()`` when construction began, for restore-to-first-instruction times:
    ``device.first_exit`` holds each vCPU's first exit).

    Exactly one of ``handler_socket`` (lazy) and ``mem_file`` (eager) is given.
    """

    def __init__(self, state: VmState, *, handler_socket: str | None = None,
                 mem_file: str | None = None, kvm: Kvm | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, overlay: str | None = None,
                 overlay_pages: str | None = None, dirty_log: bool = False) -> None:
        self.t_created = time.monotonic()
        if (handler_socket is None) == (mem_file is None):
            raise ValueError("give exactly one of handler_socket (lazy) or mem_file (eager)")
        if state.guest.get("kind") != GUEST_KIND:
            raise VmStateError(f"the snapshot is of {state.guest.get('kind')!r}, not the "
                               f"built-in guest ({GUEST_KIND})")
        self.state = state
        self.layout = GuestLayout(tuple((r.guest_addr, r.size) for r in state.regions))
        backing = Backing.SMALL if state.page_size == 4096 else Backing.HUGETLB_2M
        self.memory = GuestMemory.create(list(self.layout.regions), name="restored guest",
                                         backing=backing)
        self._sock: socket.socket | None = None
        self._uffd: Userfaultfd | None = None
        self._watch: threading.Thread | None = None
        self.handler_error: str | None = None
        self._started = False
        self._closing = False
        #: Per region, the pages given back (balloon) since the restore: part of a diff.
        self._discarded = [np.zeros(r.size // 4096, dtype=np.bool_) for r in state.regions]
        self.memory.set_discard_hook(self._note_discard)
        #: Seconds spent in each step (where restore time goes; the benchmark prints them).
        self.timings: dict[str, float] = {}
        try:
            t = time.monotonic()
            self.machine = Machine(self.memory, vcpus=len(state.vcpus),
                                   irqchip=state.irqchips is not None,
                                   pit=state.pit is not None, kvm=kvm, dirty_log=dirty_log)
            self.timings["machine"] = time.monotonic() - t
            t = time.monotonic()
            if handler_socket is not None:
                self._hand_over(handler_socket, connect_timeout)
                self.timings["handshake"] = time.monotonic() - t
            else:
                assert mem_file is not None
                eager_load(self.memory, state, mem_file, overlay, overlay_pages)
                self.timings["eager_copy"] = time.monotonic() - t
            restore_devices(self.machine.vm, clock_ns=state.clock_ns,
                            irqchips=state.irqchips, pit=state.pit)
            xsave_size = self.machine.vm.xsave_size()
            for vcpu, vstate in zip(self.machine.vcpus, state.vcpus, strict=True):
                restore_vcpu(vcpu, vstate, xsave_size=xsave_size)
            self.device = WorkloadDevice(self.machine, len(state.vcpus))
            self.machine.add_io_device(abi.WORKLOAD_PORT_BASE, self.device.port_count,
                                       self.device)
            self.balloon = BalloonDevice(self.memory, self.layout)
            self.machine.add_io_device(abi.BALLOON_PORT, abi.BALLOON_PORT_COUNT, self.balloon)
            self.console = DebugConsole()
            self.machine.add_io_device(abi.DEBUG_CONSOLE_PORT, 1, self.console)
            self.workload = Workload(self.device, self.machine, self.layout)
        except BaseException:
            self._teardown()
            raise

    def _note_discard(self, host_addr: int, length: int) -> None:
        for region, marks in zip(self.memory.regions, self._discarded, strict=True):
            if region.host_addr <= host_addr < region.host_addr + region.size:
                first = (host_addr - region.host_addr) // 4096
                marks[first:first + length // 4096] = True

    def written_pages(self) -> list[npt.NDArray[np.bool_]]:
        """Per region, one bool per 4 KiB page: written by the guest (KVM's dirty log, which
        this call also clears) or given back since the restore -- what a diff snapshot holds.

        A superset: a shadow-paging KVM such as PVM logs a page when it maps it writable,
        which it may do on a read of a page the guest's page tables mark dirty. Needs
        ``dirty_log=True``."""
        if not self.machine.dirty_log:
            raise RuntimeError("the VM was restored without dirty logging (dirty_log=True)")
        out = []
        for slot, (region, gone) in enumerate(zip(self.memory.regions, self._discarded,
                                                  strict=True)):
            raw = self.machine.vm.get_dirty_log(slot, region.size)
            bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
            out.append(bits[:region.size // 4096].astype(np.bool_) | gone)
        return out

    def _hand_over(self, path: str, timeout: float) -> None:
        self._uffd, self._sock = hand_over(self.memory, self.state, path, timeout)

    def _watch_handler(self) -> None:
        sock = self._sock
        assert sock is not None
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        while self.machine.running or not self._started:
            if not poller.poll(100):
                continue
            if self._closing:
                return
            try:
                data = sock.recv(4096)
            except OSError as err:
                data, why = b"", str(err)
            else:
                why = data.decode("utf-8", "replace").strip() or "closed the connection"
            self.handler_error = f"the page-fault handler went away: {why}"
            _log.error("%s; stopping the restored VM (its faults cannot be served)",
                       self.handler_error)
            self.machine.request_stop(self.handler_error)
            return

    @property
    def vcpus(self) -> int:
        return len(self.machine.vcpus)

    @property
    def tsc_khz(self) -> int:
        return self.machine.tsc_khz

    def start(self) -> None:
        """Run the vCPUs from their restored state."""
        if self._sock is not None:
            self._watch = threading.Thread(target=self._watch_handler, name="handler-watch",
                                           daemon=True)
            self._watch.start()
        self.machine.start()
        self._started = True

    def start_and_check(self, timeout: float) -> tuple[dict[str, Any], CheckResult]:
        """Start the guest and have it verify every checksum it recorded at snapshot time:
        the report (``first_exit_ms`` -- construction to the first vCPU exit --, ``ok``,
        ``check``) and the check's result."""
        self.workload.timeout = timeout
        self.start()
        deadline = time.monotonic() + timeout
        while self.device.first_exit[0] is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        out: dict[str, Any] = {}
        first = self.device.first_exit[0]
        if first is not None:
            out["first_exit_ms"] = round((first - self.t_created) * 1000, 3)
        result = check_guest(self.workload, self.state.guest)
        out.update(ok=result.ok, check=result.describe())
        return out, result

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._started and self.machine.running:
            self.workload.exit(timeout)

    def _teardown(self) -> None:
        if hasattr(self, "machine"):
            self.machine.close()
            if self.machine.running:
                return  # vCPUs stuck: keep memory and uffd for process exit (see Machine)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None
        self.memory.close()

    def close(self) -> None:
        """Stop the machine, tell the handler to exit (close the socket), free memory."""
        self._started = True
        self._closing = True
        self._teardown()
        if self._watch is not None:
            self._watch.join(1.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
