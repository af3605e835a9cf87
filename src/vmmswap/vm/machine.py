"""A KVM virtual machine: guest memory slots, vCPU threads in KVM_RUN, a port-I/O and MMIO bus.

This is the one place that runs guests. Both the built-in workload guest (:mod:`vmmswap.vm.demo`)
and the Linux loader (:mod:`vmmswap.vm.linux`) build on it, so its public API below is stable.

Public API
==========

``Machine(memory, *, vcpus=1, irqchip=False, pit=False, cpuid=True, kvm=None)``
    Opens KVM (``kvm`` may be a shared :class:`~vmmswap.vm.kvm.Kvm`), creates the VM, sets the
    TSS and identity-map addresses, creates the in-kernel irqchip (``irqchip=True``,
    KVM_CREATE_IRQCHIP) and PIT (``pit=True``, KVM_CREATE_PIT2; implies the irqchip) *before*
    the vCPUs, installs one memory slot per region of ``memory`` (a
    :class:`~vmmswap.dataplane.guest_memory.GuestMemory`; slot ``i`` = ``memory.regions[i]``), then
    creates ``vcpus`` vCPUs (APIC ids 0..n-1), each with KVM_GET_SUPPORTED_CPUID set through
    KVM_SET_CPUID2 (APIC id patched into leaves 1, 0xB and 0x1F; the hypervisor bit set).
    Raises :class:`~vmmswap.vm.kvm.KvmUnavailableError` when /dev/kvm is missing or not
    permitted. ``memory`` stays owned by the caller and must outlive the machine.

Attributes: ``memory``, ``kvm``, ``vm`` (:class:`~vmmswap.vm.kvm.VmFd`), ``vcpus``
(list of :class:`~vmmswap.vm.kvm.VcpuFd`), ``exits`` (list of :class:`VcpuExit`, filled as
vCPU threads end), ``tsc_khz`` (KVM_GET_TSC_KHZ of vCPU 0).

Before ``start()``:
    * ``add_io_device(base, length, device)``: ``device`` implements :class:`IoDevice`
      (``io_in(port, size) -> int``, ``io_out(port, size, value)``) for ports
      ``[base, base+length)``. Overlaps raise ValueError. Unclaimed ports read as all-ones and
      ignore writes, like an empty ISA bus.
    * ``add_mmio_device(base, length, device)``: the same for :class:`MmioDevice`
      (``mmio_read(addr, size) -> int``, ``mmio_write(addr, size, value)``), for guest-physical
      addresses outside every memory slot.
    * Set each vCPU's initial state directly: ``machine.vcpus[i].set_regs(...)``,
      ``.set_sregs(...)``, ``.set_msrs(...)``, ``.set_fpu(...)``. :mod:`vmmswap.vm.longmode`
      builds 64-bit entry state for the built-in guest; a Linux loader sets its own (rsi =
      boot_params, rip = entry, its own GDT and page tables). Alternatively pass
      ``setup=callable(vcpu)`` to ``start()``; it runs for each vCPU before any thread starts.

Running:
    * ``start(setup=None)``: one thread per vCPU (named ``vcpu<i>``), each looping in KVM_RUN.
    * ``request_stop(reason="stop requested")``: asks every vCPU to leave KVM_RUN and end
      (sets ``immediate_exit`` and kicks the threads with a signal). Safe from any thread,
      including a device handler running on a vCPU thread (e.g. an "exit" port).
    * ``join(timeout=None)``: waits for every vCPU thread. Raises TimeoutError if they are
      still running after ``timeout`` seconds, and re-raises the first failure: a
      :class:`GuestError` (triple fault, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_FAIL_ENTRY, an exit
      the VMM does not handle) or the exception a device raised.
    * ``run(setup=None, timeout=None)``: ``start`` + ``join``.
    * ``halt_current_vcpu()``: from a device handler on a vCPU thread, end that vCPU (as if it
      had executed HLT) once the current exit is handled.
    * ``irq_line(irq, level)``: KVM_IRQ_LINE (needs ``irqchip=True``). Safe from any thread.
    * ``stopping`` (bool): True once a stop was requested; a device that blocks waiting for
      work polls it. ``running`` (bool): some vCPU thread is alive.
    * ``close()``: stop, join (bounded), close vCPU and VM fds. Context manager.

``current_vcpu()`` (module function) returns the index of the vCPU whose thread is calling, or
None on other threads: a device shared by all vCPUs can tell them apart.

Exit handling: IO and MMIO go to the bus (string I/O with ``count > 1`` becomes ``count``
device calls). HLT ends that vCPU (an idle guest without an in-kernel irqchip has nothing to wake
it; with ``irqchip=True`` KVM handles HLT itself). SHUTDOWN (triple fault),
INTERNAL_ERROR, FAIL_ENTRY and anything unexpected stop the whole machine with a GuestError that
names the vCPU, the exit and RIP. SYSTEM_EVENT shutdown/reset stop the machine cleanly. KVM_RUN
returning EINTR (a kick, or SIGSTOP/SIGCONT from the swap monitor freezing the process during
``enable``) just re-enters KVM_RUN unless a stop was requested. A vCPU that faults on swapped-out
guest memory blocks inside KVM_RUN (GIL released) until the monitor serves the fault; nothing here
knows about swap.

Performance note: on a software KVM such as PVM (``kvm_pvm``, the backend of the development
machine; see :func:`~vmmswap.vm.kvm.kvm_flavour`) guest **ring-0** code is emulated instruction
by instruction -- about a thousand times slower than ring 3, which runs natively. The built-in
guest therefore drops to ring 3 right after setup. An IRETQ emulated there also does not carry
RFLAGS.IOPL into ring 3; grant port access with the TSS I/O bitmap instead (see
:func:`vmmswap.vm.longmode.build_tss`).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import kvm as k
from vmmswap.vm.kvm import Kvm, VcpuFd, VmFd

_log = logging.getLogger(__name__)

# A real-time signal (glibc keeps the first two for itself) nobody else in the project uses.
KICK_SIGNAL = signal.SIGRTMIN + 4

_MAX_VCPUS = 64
D = TypeVar("D")
_thread_vcpu = threading.local()


class IoDevice(Protocol):
    """A device on the port-I/O bus."""

    def io_in(self, port: int, size: int) -> int: ...

    def io_out(self, port: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    """A device on the MMIO bus (guest-physical addresses outside every memory slot)."""

    def mmio_read(self, addr: int, size: int) -> int: ...

    def mmio_write(self, addr: int, size: int, value: int) -> None: ...


class GuestError(RuntimeError):
    """The guest stopped in a way the VMM cannot continue from."""

    def __init__(self, vcpu: int, message: str) -> None:
        super().__init__(f"vCPU {vcpu}: {message}")
        self.vcpu = vcpu


@dataclass(frozen=True)
class VcpuExit:
    """How a vCPU thread ended: ``reason`` is "halted", "stopped", "system-event" or "error"."""

    vcpu: int
    reason: str
    error: BaseException | None = None


def current_vcpu() -> int | None:
    """The index of the vCPU whose thread is running this code, else None."""
    index: int | None = getattr(_thread_vcpu, "index", None)
    return index


class _Bus(Generic[D]):
    """Non-overlapping address ranges mapped to devices, looked up by bisection."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, D]] = []

    def add(self, base: int, length: int, device: D) -> None:
        if length <= 0 or base < 0:
            raise ValueError(f"{self._what} range {base:#x}+{length:#x} is empty or negative")
        end = base + length
        at = bisect.bisect_right(self._bases, base)
        for neighbour in self._entries[max(at - 1, 0):at + 1]:
            if base < neighbour[1] and neighbour[0] < end:
                raise ValueError(
                    f"{self._what} range [{base:#x}, {end:#x}) overlaps "
                    f"[{neighbour[0]:#x}, {neighbour[1]:#x}) of {neighbour[2]!r}")
        self._bases.insert(at, base)
        self._entries.insert(at, (base, end, device))

    def find(self, addr: int) -> D | None:
        at = bisect.bisect_right(self._bases, addr) - 1
        if at >= 0:
            base, end, device = self._entries[at]
            if base <= addr < end:
                return device
        return None


@dataclass
class _Pause:
    """A pause request (see :meth:`Machine.pause`)."""

    job: Callable[[VcpuFd], object]
    results: dict[int, object]
    errors: dict[int, BaseException]
    arrived: threading.Condition
    release: threading.Event


def _noop_handler(signum: int, frame: object) -> None:
    """The kick signal only needs to interrupt KVM_RUN; there is nothing to do."""


class Machine:
    """A VM with its memory slots, vCPUs and device buses (see the module docstring)."""

    def __init__(self, memory: GuestMemory, *, vcpus: int = 1, irqchip: bool = False,
                 pit: bool = False, cpuid: bool = True, kvm: Kvm | None = None,
                 dirty_log: bool = False) -> None:
        if not 1 <= vcpus <= _MAX_VCPUS:
            raise ValueError(f"vcpus must be between 1 and {_MAX_VCPUS}, got {vcpus}")
        self.memory = memory
        self._owns_kvm = kvm is None
        self.kvm = kvm if kvm is not None else Kvm()
        self.vcpus: list[VcpuFd] = []
        self.exits: list[VcpuExit] = []
        self._io: _Bus[IoDevice] = _Bus("port")
        self._mmio: _Bus[MmioDevice] = _Bus("MMIO")
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._errors: list[BaseException] = []
        self._started = False
        self._closed = False
        self._kick_ok = False
        self._pause: _Pause | None = None
        #: What the VM has in the kernel (a snapshot captures exactly these).
        self.irqchip = irqchip or pit
        self.pit = pit
        #: Slots log the guest's writes (KVM_MEM_LOG_DIRTY_PAGES; read with vm.get_dirty_log).
        self.dirty_log = dirty_log
        try:
            self.vm: VmFd = self.kvm.create_vm()
            self._setup_vm(irqchip or pit, pit)
            for index in range(vcpus):
                self.vcpus.append(self.vm.create_vcpu(index))
            if cpuid:
                self._set_cpuid()
        except BaseException:
            self._close_fds()
            raise
        self.tsc_khz = self.vcpus[0].get_tsc_khz()

    # --- construction -------------------------------------------------------------------------
    def _setup_vm(self, irqchip: bool, pit: bool) -> None:
        if self.kvm.check_extension(k.KVM_CAP_SET_TSS_ADDR):
            self.vm.set_tss_addr(k.KVM_DEFAULT_TSS_ADDR)
        if self.kvm.check_extension(k.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            self.vm.set_identity_map_addr(k.KVM_DEFAULT_IDENTITY_MAP_ADDR)
        if irqchip:
            self.vm.create_irqchip()
        if pit:
            self.vm.create_pit2()
        for slot, region in enumerate(self.memory.regions):
            # Safety: the regions are mapped for the GuestMemory's lifetime, which the caller
            # keeps longer than this machine (documented in the class contract).
            self.vm.set_user_memory_region(
                slot, region.guest_addr, region.size, region.host_addr,
                k.KVM_MEM_LOG_DIRTY_PAGES if self.dirty_log else 0)

    def _set_cpuid(self) -> None:
        supported = self.kvm.supported_cpuid()
        for vcpu in self.vcpus:
            entries = [k.KvmCpuidEntry2.from_buffer_copy(e) for e in supported]
            for entry in entries:
                if entry.function == 1:
                    entry.ebx = (entry.ebx & 0x00FF_FFFF) | (vcpu.index << 24)
                    entry.ecx |= k.X86_CPUID_HYPERVISOR_ECX
                elif entry.function in (0xB, 0x1F):
                    entry.edx = vcpu.index
            vcpu.set_cpuid2(entries)

    # --- devices --------------------------------------------------------------------------------
    def add_io_device(self, base: int, length: int, device: IoDevice) -> None:
        """Route ports ``[base, base+length)`` to ``device``."""
        if base + length > 0x10000:
            raise ValueError(f"port range {base:#x}+{length:#x} exceeds the 64 KiB port space")
        self._io.add(base, length, device)

    def add_mmio_device(self, base: int, length: int, device: MmioDevice) -> None:
        """Route guest-physical ``[base, base+length)`` (outside every slot) to ``device``."""
        for region in self.memory.regions:
            if base < region.guest_addr + region.size and region.guest_addr < base + length:
                raise ValueError(f"MMIO range {base:#x}+{length:#x} overlaps guest RAM at "
                                 f"{region.guest_addr:#x}+{region.size:#x}")
        self._mmio.add(base, length, device)

    def irq_line(self, irq: int, level: int) -> None:
        """Drive in-kernel irqchip input ``irq`` (KVM_IRQ_LINE)."""
        self.vm.irq_line(irq, level)

    # --- running ---------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_reason(self) -> str:
        return self._stop_reason

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def start(self, setup: Callable[[VcpuFd], None] | None = None) -> None:
        """Start one thread per vCPU; ``setup`` runs for every vCPU first."""
        if self._started:
            raise RuntimeError("a Machine runs once; build a new one to run again")
        if setup is not None:
            for vcpu in self.vcpus:
                setup(vcpu)
        self._install_kick()
        self._started = True
        for vcpu in self.vcpus:
            thread = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                      name=f"vcpu{vcpu.index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _install_kick(self) -> None:
        """Make the kick signal harmless so it can interrupt KVM_RUN in vCPU threads."""
        current = signal.getsignal(KICK_SIGNAL)
        if callable(current):
            self._kick_ok = True
            return
        try:
            signal.signal(KICK_SIGNAL, _noop_handler)
            self._kick_ok = True
        except ValueError:
            # Not the main thread: without a handler the signal would kill the process, so
            # stop requests take effect at each vCPU's next exit only.
            _log.warning("Machine started outside the main thread: request_stop() cannot "
                         "interrupt a vCPU inside KVM_RUN")

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask every vCPU to leave KVM_RUN and end its thread (any thread may call this)."""
        with self._lock:
            if not self._stop.is_set():
                self._stop_reason = reason
                self._stop.set()
            if self._closed:
                return
        for vcpu in self.vcpus:
            # KVM_RUN returns EINTR at once while immediate_exit is set, closing the race
            # between a thread's stop check and its next KVM_RUN.
            vcpu.run_state.immediate_exit = 1
        if self._kick_ok:
            for thread in self._threads:
                if thread.is_alive() and thread is not threading.current_thread():
                    ident = thread.ident
                    if ident is not None:
                        with contextlib.suppress(ProcessLookupError):
                            signal.pthread_kill(ident, KICK_SIGNAL)

    def pause(self, job: Callable[[VcpuFd], object], timeout: float = 30.0) -> list[object]:
        """Stop every vCPU outside KVM_RUN, run ``job(vcpu)`` on each vCPU's own thread, and
        keep them there until :meth:`resume`; the jobs' results in vCPU order.

        Works wherever the guest is (a snapshot of a guest that never idles at a port): each
        vCPU gets ``immediate_exit`` and the kick signal, so its KVM_RUN returns EINTR -- and
        KVM completes a pending port-I/O or MMIO exit first, so the state the job reads is
        whole. A job's exception is raised here (after resuming). TimeoutError (after
        resuming) when a vCPU does not arrive in time, e.g. one stuck in a device handler.
        """
        if not self.running:
            raise RuntimeError("pause() needs running vCPUs")
        request = _Pause(job, {}, {}, threading.Condition(), threading.Event())
        with self._lock:
            if self._pause is not None:
                raise RuntimeError("the machine is already paused")
            self._pause = request
        for vcpu in self.vcpus:
            vcpu.run_state.immediate_exit = 1
        self._kick()
        live = {t.name for t in self._threads if t.is_alive()}
        want = {i for i, _ in enumerate(self.vcpus) if f"vcpu{i}" in live}
        deadline = time.monotonic() + timeout
        with request.arrived:
            while not want <= set(request.results) | set(request.errors):
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    break
                request.arrived.wait(left)
        missing = want - set(request.results) - set(request.errors)
        if missing or request.errors:
            self.resume()
            if missing:
                raise TimeoutError(f"vCPUs {sorted(missing)} did not pause within {timeout} s")
            raise next(iter(request.errors.values()))
        return [request.results[i] for i in sorted(want)]

    def resume(self) -> None:
        """Let vCPUs paused by :meth:`pause` run on."""
        with self._lock:
            request, self._pause = self._pause, None
            if not self._stop.is_set():
                for vcpu in self.vcpus:  # also those that never arrived
                    vcpu.run_state.immediate_exit = 0
        if request is not None:
            request.release.set()

    def _kick(self) -> None:
        if self._kick_ok:
            for thread in self._threads:
                if thread.is_alive() and thread is not threading.current_thread():
                    ident = thread.ident
                    if ident is not None:
                        with contextlib.suppress(ProcessLookupError):
                            signal.pthread_kill(ident, KICK_SIGNAL)

    def pause_point(self, index: int) -> None:
        """For a device that keeps vCPU ``index``'s thread waiting outside KVM_RUN (the
        built-in guest's idle command port): serve a pending :meth:`pause` there. The vCPU is
        then in the middle of its exit, registers at the instruction that caused it, which
        runs again after a restore."""
        if self._pause is not None:
            self._paused(self.vcpus[index])

    def _paused(self, vcpu: VcpuFd) -> None:
        """On a vCPU thread whose KVM_RUN returned EINTR: serve a pause request, if any."""
        request = self._pause
        if request is None or vcpu.index in request.results or vcpu.index in request.errors:
            return
        try:
            result = request.job(vcpu)
            with request.arrived:
                request.results[vcpu.index] = result
                request.arrived.notify_all()
        except BaseException as exc:  # handed to pause(), which raises it
            with request.arrived:
                request.errors[vcpu.index] = exc
                request.arrived.notify_all()
        while not request.release.wait(0.05):
            if self._stop.is_set():
                return
        with self._lock:
            if not self._stop.is_set():
                vcpu.run_state.immediate_exit = 0

    def halt_current_vcpu(self) -> None:
        """End the calling vCPU (reason "halted") once the exit being handled completes.

        For devices, on a vCPU thread: a guest running in ring 3 cannot execute HLT, so it
        stops a CPU through a port instead (like PSCI CPU_OFF on Arm).
        """
        if current_vcpu() is None:
            raise RuntimeError("halt_current_vcpu() must be called from a vCPU thread")
        _thread_vcpu.halt = True

    def join(self, timeout: float | None = None) -> None:
        """Wait for every vCPU thread; raise the first failure (see module docstring)."""
        deadline = None if timeout is None else _now() + timeout
        for thread in self._threads:
            remaining = None if deadline is None else max(deadline - _now(), 0.0)
            thread.join(remaining)
            if thread.is_alive():
                raise TimeoutError(f"{thread.name} still running after {timeout} s")
        if self._errors:
            raise self._errors[0]

    def run(self, setup: Callable[[VcpuFd], None] | None = None,
            timeout: float | None = None) -> None:
        """``start`` then ``join``."""
        self.start(setup)
        self.join(timeout)

    # --- the vCPU loop ---------------------------------------------------------------------------
    def _vcpu_thread(self, vcpu: VcpuFd) -> None:
        _thread_vcpu.index = vcpu.index
        _thread_vcpu.halt = False
        try:
            reason = self._vcpu_loop(vcpu)
            self._record(VcpuExit(vcpu.index, reason))
        except BaseException as exc:
            with self._lock:
                self._errors.append(exc)
            self._record(VcpuExit(vcpu.index, "error", exc))
            self.request_stop(f"vCPU {vcpu.index} failed: {exc}")

    def _record(self, record: VcpuExit) -> None:
        with self._lock:
            self.exits.append(record)

    def _vcpu_loop(self, vcpu: VcpuFd) -> str:
        run = vcpu.run_state
        while True:
            if self._stop.is_set():
                return "stopped"
            try:
                reason = vcpu.run()
            except InterruptedError:
                # A kick (stop or pause), or SIGSTOP/SIGCONT around `enable`: re-check, re-enter.
                if self._pause is not None:
                    self._paused(vcpu)
                continue
            if reason == k.KVM_EXIT_IO:
                self._handle_io(vcpu)
                if _thread_vcpu.halt:
                    return "halted"
            elif reason == k.KVM_EXIT_MMIO:
                self._handle_mmio(vcpu)
                if _thread_vcpu.halt:
                    return "halted"
            elif reason == k.KVM_EXIT_HLT:
                return "halted"
            elif reason == k.KVM_EXIT_INTR:
                continue
            elif reason == k.KVM_EXIT_SYSTEM_EVENT:
                kind = int(run.exit.system_event.type)
                if kind in (k.KVM_SYSTEM_EVENT_SHUTDOWN, k.KVM_SYSTEM_EVENT_RESET):
                    what = "shutdown" if kind == k.KVM_SYSTEM_EVENT_SHUTDOWN else "reset"
                    self.request_stop(f"guest system event: {what}")
                    return "system-event"
                raise GuestError(vcpu.index, f"guest system event {kind} (crash?)"
                                 + self._where(vcpu))
            else:
                raise GuestError(vcpu.index, self._describe_exit(vcpu, reason))

    def _handle_io(self, vcpu: VcpuFd) -> None:
        io = vcpu.run_state.exit.io
        port, size, count = int(io.port), int(io.size), int(io.count)
        device = self._io.find(port)
        data = vcpu.pio_data(int(io.data_offset), size * count)
        try:
            if io.direction == k.KVM_EXIT_IO_OUT:
                if device is not None:
                    for i in range(count):
                        value = int.from_bytes(data[i * size:(i + 1) * size], "little")
                        device.io_out(port, size, value)
            else:
                mask = (1 << (8 * size)) - 1
                for i in range(count):
                    value = device.io_in(port, size) if device is not None else mask
                    data[i * size:(i + 1) * size] = (value & mask).to_bytes(size, "little")
        finally:
            data.release()

    def _handle_mmio(self, vcpu: VcpuFd) -> None:
        mmio = vcpu.run_state.exit.mmio
        addr, size = int(mmio.phys_addr), int(mmio.len)
        device = self._mmio.find(addr)
        if mmio.is_write:
            if device is not None:
                device.mmio_write(addr, size, int.from_bytes(bytes(mmio.data)[:size], "little"))
        else:
            mask = (1 << (8 * size)) - 1
            value = device.mmio_read(addr, size) & mask if device is not None else mask
            for i, byte in enumerate(value.to_bytes(size, "little")):
                mmio.data[i] = byte

    def _where(self, vcpu: VcpuFd) -> str:
        try:
            regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
        except OSError:
            return ""
        return (f" at rip={regs.rip:#x} rsp={regs.rsp:#x} cr0={sregs.cr0:#x} "
                f"cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} efer={sregs.efer:#x}")

    def _describe_exit(self, vcpu: VcpuFd, reason: int) -> str:
        run = vcpu.run_state
        name = k.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
        where = self._where(vcpu)
        if reason == k.KVM_EXIT_SHUTDOWN:
            return ("triple fault (KVM_EXIT_SHUTDOWN): the guest hit an exception it could not "
                    f"deliver{where}")
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            internal = run.exit.internal
            data = ", ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
            return (f"KVM_EXIT_INTERNAL_ERROR suberror {internal.suberror} "
                    f"(1 = emulation failure, 3 = event delivery) data [{data}]{where}")
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            fail = run.exit.fail_entry
            return (f"KVM_EXIT_FAIL_ENTRY: hardware entry failure reason "
                    f"{fail.hardware_entry_failure_reason:#x} on host CPU {fail.cpu} (invalid "
                    f"guest state: check sregs){where}")
        if reason == k.KVM_EXIT_UNKNOWN:
            return f"KVM_EXIT_UNKNOWN: hardware exit reason {run.exit.hw.hardware_exit_reason:#x}"
        if reason == k.KVM_EXIT_EXCEPTION:
            return (f"KVM_EXIT_EXCEPTION: exception {run.exit.ex.exception} "
                    f"error code {run.exit.ex.error_code:#x}{where}")
        return f"unhandled {name}{where}"

    # --- teardown --------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Stop the vCPUs, wait for them (bounded), close every KVM fd. Idempotent."""
        if self._closed:
            return
        if self.running:
            self.request_stop("machine closed")
            for thread in self._threads:
                thread.join(timeout)
            if self.running:
                # A vCPU stuck in KVM_RUN keeps its fds in use; leave them to process exit
                # rather than closing under it.
                _log.error("vCPU threads did not stop within %s s; leaking their fds", timeout)
                self._closed = True
                return
        self._closed = True
        self._close_fds()

    def _close_fds(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        if hasattr(self, "vm"):
            self.vm.close()
        if self._owns_kvm:
            self.kvm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _now() -> float:
    return time.monotonic()


__all__: Sequence[str] = [
    "GuestError", "IoDevice", "KICK_SIGNAL", "Machine", "MmioDevice", "VcpuExit",
    "current_vcpu",
]
