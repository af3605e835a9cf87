"""The host side of the built-in guest's command protocol.

Each vCPU owns a block of ports (:mod:`vmmswap.vm.guest_abi`). It reads its next opcode from
``PORT_CMD`` -- the vCPU thread then waits in :class:`WorkloadDevice` (GIL released) until the
host queues a command -- reads the arguments word by word from ``PORT_ARG``, pushes result words
to ``PORT_RESULT`` and finishes with a status on ``PORT_DONE``. Nothing crosses through guest
memory, so the host never reads memory that may be swapped out.

:class:`Workload` is the API the demo, tests and benchmark use. It speaks in *data offsets* (the
linear view of :class:`~vmmswap.vm.layout.GuestLayout`), splits ranges per region and, when asked,
across vCPUs that run in parallel.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vmmswap.uffd.pagesize import PAGE_SIZE, bytes_to_pages, pages_to_bytes
from vmmswap.vm import guest_abi as abi
from vmmswap.vm.guest_abi import Op
from vmmswap.vm.latency import LatencyHistogram
from vmmswap.vm.layout import GuestLayout
from vmmswap.vm.machine import GuestError, Machine

_POLL_S = 0.05
MIB = 1 << 20
PAGE = PAGE_SIZE  # the guest walks memory in 4 KiB pages, like the host
DEFAULT_TIMEOUT_S = 600.0
_NO_FLAGS = abi.TortureFlag(0)


class WorkloadError(RuntimeError):
    """A command failed, the guest faulted, or the machine stopped before answering."""


@dataclass
class _Pending:
    op: Op
    args: list[int]
    words: list[int] = field(default_factory=list)
    results: list[int] = field(default_factory=list)
    status: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    finished: float = 0.0


@dataclass
class _Park:
    """A host-side job for a vCPU thread idle at its command port (see :meth:`park`)."""

    job: Callable[[int], object]
    parked: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class WorkloadDevice:
    """The per-vCPU command ports (an :class:`~vmmswap.vm.machine.IoDevice`)."""

    def __init__(self, machine: Machine, vcpus: int) -> None:
        self._machine = machine
        self._queues: list[queue.Queue[_Pending | _Park]] = [queue.Queue() for _ in range(vcpus)]
        self._current: list[_Pending | None] = [None] * vcpus
        self.vcpus = vcpus
        #: ``time.monotonic()`` of each vCPU's first command-port read (its first exit).
        self.first_exit: list[float | None] = [None] * vcpus

    def park(self, vcpu: int, job: Callable[[int], object]) -> _Park:
        """Queue ``job(vcpu)`` to run on ``vcpu``'s own thread once it is idle, then keep the
        vCPU parked there until ``release`` is set (or the machine stops).

        Idle means: every command queued before has finished and the guest sits at the
        ``in`` of its command port, an exit not yet completed -- its registers are those of
        that instruction, which runs again on the next KVM_RUN. That is the safe point of a
        snapshot (:mod:`vmmswap.vm.snapshot`): the vCPU is outside KVM_RUN, on the thread KVM
        expects, and touches no guest memory until released.
        """
        item = _Park(job)
        self._queues[vcpu].put(item)
        return item

    @property
    def port_count(self) -> int:
        return self.vcpus * abi.PORT_STRIDE

    def submit(self, vcpu: int, op: Op, args: Sequence[int] = ()) -> _Pending:
        """Queue a command for ``vcpu``; commands of one vCPU run in order."""
        pending = _Pending(op, list(args))
        for value in args:
            if not 0 <= value < 1 << 64:
                raise ValueError(f"argument {value} does not fit in 64 bits")
            pending.words += [value & 0xFFFF_FFFF, value >> 32]
        self._queues[vcpu].put(pending)
        return pending

    def _run_parked(self, vcpu: int, item: _Park) -> None:
        try:
            item.result = item.job(vcpu)
        except BaseException as exc:  # handed to the waiter, which raises it
            item.error = exc
        item.parked.set()
        while not item.release.wait(_POLL_S):
            if self._machine.stopping:
                return

    def _decode(self, port: int) -> tuple[int, int]:
        offset = port - abi.WORKLOAD_PORT_BASE
        return offset // abi.PORT_STRIDE, offset % abi.PORT_STRIDE

    def io_in(self, port: int, size: int) -> int:
        vcpu, reg = self._decode(port)
        if reg == abi.PORT_CMD:
            if self.first_exit[vcpu] is None:
                self.first_exit[vcpu] = time.monotonic()
            while True:
                try:
                    item = self._queues[vcpu].get(timeout=_POLL_S)
                except queue.Empty:
                    if self._machine.stopping:
                        return int(Op.NOP)  # the vCPU loop sees the stop after this exit
                    self._machine.pause_point(vcpu)
                    continue
                if isinstance(item, _Park):
                    self._run_parked(vcpu, item)
                    continue
                pending = item
                break
            pending.started = time.monotonic()
            self._current[vcpu] = pending
            return int(pending.op)
        current = self._current[vcpu]
        if reg == abi.PORT_ARG and current is not None and current.words:
            return current.words.pop(0)
        raise GuestError(vcpu, f"guest read port {port:#x} with no argument pending")

    def io_out(self, port: int, size: int, value: int) -> None:
        vcpu, reg = self._decode(port)
        current = self._current[vcpu]
        if reg == abi.PORT_RESULT:
            if current is None:
                current = self._current[vcpu] = _Pending(Op.NOP, [])  # exception while idle
            current.results.append(value)
        elif reg == abi.PORT_DONE:
            if current is None:
                raise GuestError(vcpu, f"guest reported status {value:#x} with no command")
            self._current[vcpu] = None
            if current.op == Op.EXIT:
                self._machine.halt_current_vcpu()
            current.status = value
            current.finished = time.monotonic()
            current.done.set()
            if value & 0xFFFF_FF00 == abi.STATUS_EXCEPTION:
                raise GuestError(vcpu, describe_exception(value, current.results))


def describe_exception(status: int, words: list[int]) -> str:
    vals = [words[i] | (words[i + 1] << 32) for i in range(0, len(words) - 1, 2)]
    vector, error_code, rip, cr2, cs, rflags = (vals + [0] * 6)[:6]
    return (f"guest exception {vector} error code {error_code:#x} at rip={rip:#x} "
            f"cs={cs:#x} rflags={rflags:#x} cr2={cr2:#x}")


@dataclass
class OpReport:
    """What a walking command (fill, read, verify, checksum) measured, over all its vCPUs."""

    op: Op
    pages: int = 0
    wall_s: float = 0.0
    guest_s: float = 0.0  # the slowest vCPU's summed TSC time
    latency: LatencyHistogram | None = None
    read_sum: int = 0
    mismatches: int = 0
    first_bad: int | None = None  # guest-physical address of the first wrong qword
    checksums: list[int] = field(default_factory=list)


@dataclass
class TortureReport:
    """What one TORTURE command did and found (guest-physical addresses)."""

    writes: int
    verifies: int
    balloons: int
    pages_checked: int
    bad_qwords: int
    first_bad: int
    expected_version: int
    read: int

    def describe(self) -> str:
        if not self.bad_qwords:
            return "no mismatch"
        if self.expected_version == 0xFFFF_FFFF:
            return f"the balloon refused to take {self.first_bad:#x}"
        what = "a zero qword" if self.read == 0 else f"{self.read:#018x}"
        return (f"{self.bad_qwords} wrong qwords, the first at guest address "
                f"{self.first_bad:#x} (page {self.first_bad & ~(PAGE - 1):#x}): expected "
                f"version {self.expected_version}, read {what}")


class Workload:
    """Drive the built-in guest: fill, read, rewrite, verify, checksum, balloon, exit."""

    def __init__(self, device: WorkloadDevice, machine: Machine, guest_layout: GuestLayout,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.device = device
        self.machine = machine
        self.layout = guest_layout
        self.tsc_khz = machine.tsc_khz
        self.timeout = timeout

    # --- plumbing ------------------------------------------------------------------------------
    def wait(self, pending: _Pending, timeout: float | None = None) -> _Pending:
        """Wait for one command; raise WorkloadError on failure, timeout or a stopped machine."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not pending.done.wait(_POLL_S):
            if not self.machine.running:
                raise WorkloadError(f"{pending.op.name}: the machine stopped before answering "
                                    f"({self.machine.stop_reason or 'no vCPU running'})")
            if time.monotonic() > deadline:
                raise WorkloadError(f"{pending.op.name}: no answer within "
                                    f"{self.timeout if timeout is None else timeout} s")
        status = pending.status
        if status is not None and status & 0xFFFF_FF00 == abi.STATUS_EXCEPTION:
            raise WorkloadError(describe_exception(status, pending.results))
        if status == abi.STATUS_BAD_OPCODE:
            raise WorkloadError(f"guest did not understand opcode {pending.op}")
        return pending

    def _split(self, offset: int, length: int, vcpus: Sequence[int]) -> list[list[tuple[int, int]]]:
        """Guest-physical pieces of a data range, cut in page-aligned shares, one per vCPU."""
        self.layout.span(offset, length)  # validates the whole range first
        pages = bytes_to_pages(length)
        per = pages_to_bytes(-(-pages // len(vcpus)))
        shares = []
        for i in range(len(vcpus)):
            lo = offset + i * per
            hi = min(offset + length, lo + per)
            shares.append(self.layout.span(lo, hi - lo) if lo < hi else [])
        return shares

    def _vcpus(self, vcpus: Sequence[int] | int | None) -> list[int]:
        if vcpus is None:
            return list(range(self.device.vcpus))
        if isinstance(vcpus, int):
            return [vcpus]
        return list(vcpus)

    def _walk(self, op: Op, offset: int, length: int, extra: Sequence[int], *,
              vcpus: Sequence[int] | int | None, replicate: bool = False) -> OpReport:
        who = self._vcpus(vcpus)
        if replicate:
            shares = [self.layout.span(offset, length) for _ in who]
        else:
            shares = self._split(offset, length, who)
        start = time.monotonic()
        submitted: list[tuple[int, _Pending]] = []
        for vcpu, share in zip(who, shares, strict=True):
            for addr, size in share:
                submitted.append((vcpu, self.device.submit(vcpu, op, [addr, size, *extra])))
        report = OpReport(op, latency=LatencyHistogram(self.tsc_khz))
        cycles: dict[int, int] = {}
        for vcpu, pending in submitted:
            self.wait(pending)
            cycles[vcpu] = cycles.get(vcpu, 0) + self._parse(pending, report)
        report.wall_s = time.monotonic() - start
        report.guest_s = max(cycles.values(), default=0) / (self.tsc_khz * 1000.0)
        return report

    def _parse(self, pending: _Pending, report: OpReport) -> int:
        words = pending.results
        pos = 0

        def take64() -> int:
            nonlocal pos
            value = words[pos] | (words[pos + 1] << 32)
            pos += 2
            return value

        cycles = take64()
        report.pages += take64()
        used = words[pos]
        pos += 1
        assert report.latency is not None
        for _ in range(used):
            report.latency.add_bucket(words[pos], words[pos + 1])
            pos += 2
        if pending.op == Op.READ:
            report.read_sum = (report.read_sum + take64()) % (1 << 64)
        elif pending.op == Op.VERIFY:
            bad, first = take64(), take64()
            if bad and report.first_bad is None:
                report.first_bad = first
            report.mismatches += bad
        elif pending.op == Op.CHECKSUM:
            count = words[pos]
            pos += 1
            report.checksums += [take64() for _ in range(count)]
        return cycles

    # --- commands --------------------------------------------------------------------------------
    def fill(self, offset: int, length: int, seed: int, *,
             vcpus: Sequence[int] | int | None = None) -> OpReport:
        """Write the pattern of ``seed`` (0 = zeros) over a data range; also "rewrite"."""
        return self._walk(Op.FILL, offset, length, [seed], vcpus=vcpus)

    def read(self, offset: int, length: int, *, vcpus: Sequence[int] | int | None = None,
             replicate: bool = False) -> OpReport:
        """Read every qword; with ``replicate`` every vCPU reads the whole range at once."""
        return self._walk(Op.READ, offset, length, [], vcpus=vcpus, replicate=replicate)

    def verify(self, offset: int, length: int, seed: int, *,
               vcpus: Sequence[int] | int | None = None) -> OpReport:
        """Compare a data range with the pattern of ``seed``; mismatches land in the report."""
        return self._walk(Op.VERIFY, offset, length, [seed], vcpus=vcpus)

    def checksum(self, offset: int, length: int, chunk: int = 2 * MIB, *,
                 vcpu: int = 0) -> OpReport:
        """One checksum per ``chunk`` (chunks never straddle regions), on one vCPU."""
        if chunk <= 0 or chunk % PAGE:
            raise ValueError("checksum chunk must be a positive number of pages")
        pieces: list[tuple[int, int]] = []
        for addr, size in self.layout.span(offset, length):
            step = chunk * abi.CHECKSUM_MAX_CHUNKS
            pieces += [(a, min(step, addr + size - a)) for a in range(addr, addr + size, step)]
        report = OpReport(Op.CHECKSUM, latency=LatencyHistogram(self.tsc_khz))
        start = time.monotonic()
        pendings = [self.device.submit(vcpu, Op.CHECKSUM, [a, s, chunk]) for a, s in pieces]
        cycles = 0
        for pending in pendings:
            self.wait(pending)
            cycles += self._parse(pending, report)
        report.wall_s = time.monotonic() - start
        report.guest_s = cycles / (self.tsc_khz * 1000.0)
        return report

    def balloon(self, offset: int, length: int, *, vcpu: int = 0) -> None:
        """The guest gives a data range back to the host (which discards it)."""
        for addr, size in self.layout.span(offset, length):
            pending = self.wait(self.device.submit(vcpu, Op.BALLOON, [addr, size]))
            if pending.status:
                raise WorkloadError(f"balloon of {addr:#x}+{size:#x} refused: errno "
                                    f"{pending.status}")

    def collect(self, pending: _Pending, timeout: float | None = None) -> OpReport:
        """Wait for one command submitted with ``device.submit`` and parse its report."""
        self.wait(pending, timeout)
        report = OpReport(pending.op, latency=LatencyHistogram(self.tsc_khz))
        self._parse(pending, report)
        return report

    def torture_submit(self, vcpu: int, start: int, length: int, table: int, seed: int,
                       ops: int, flags: abi.TortureFlag = _NO_FLAGS) -> _Pending:
        """Queue a TORTURE command (guest-physical ``start``/``length``/``table``); it runs
        while the host does other things. Collect it with :meth:`torture_result`."""
        if length % PAGE or start % PAGE or table % PAGE or not 0 <= ops < 1 << 32:
            raise ValueError("torture range and table must be page aligned, ops a u32")
        return self.device.submit(vcpu, Op.TORTURE, [start, length, table, seed,
                                                     ops | int(flags) << 32])

    def torture_result(self, pending: _Pending, timeout: float | None = None) -> TortureReport:
        self.collect(pending, timeout)
        words = pending.results[-2 * abi.TORTURE_RESULTS:]
        values = [words[i] | words[i + 1] << 32 for i in range(0, len(words), 2)]
        return TortureReport(*values)

    def nop(self, vcpu: int = 0) -> float:
        """A round trip through the command ports; returns its wall time in seconds."""
        start = time.monotonic()
        self.wait(self.device.submit(vcpu, Op.NOP))
        return time.monotonic() - start

    def exit(self, timeout: float = 30.0) -> None:
        """Every vCPU acknowledges and halts; then the machine's threads end."""
        pendings = [self.device.submit(v, Op.EXIT) for v in range(self.device.vcpus)]
        for pending in pendings:
            self.wait(pending, timeout)
        self.machine.join(timeout)
