"""Snapshot memtest86+ mid-pass and restore it lazily: an oracle nobody here wrote judges it.

memtest never idles: its vCPUs are always testing, so the snapshot uses the general safe point,
:meth:`~vmmswap.vm.machine.Machine.pause` (every vCPU out of KVM_RUN with its exit completed).
Besides the vCPUs (registers, XSAVE, MSRs, LAPIC -- memtest enables its APICs) the machine's
in-kernel PIC/IOAPIC and PIT and the UART's registers and queued input are saved; the console
output so far goes into the state file too, so the restored screen shows memtest's whole status
rather than only what it redraws later. Memory is written in Firecracker's layout
(:func:`~vmmswap.vm.snapshot.write_memory_file`), and :class:`RestoredMemtest` brings it back
through Firecracker's handshake (:func:`~vmmswap.vm.restore.hand_over`) or eagerly. A restored
memtest then finishes its pass: every location of its range is checked against the pattern it
wrote before the snapshot, so a page served wrong is an error on its screen.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Final

from vmmswap.control.monitor_launch import registered_ranges
from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.uffd.userfaultfd import Userfaultfd
from vmmswap.vm.linux.serial import COM1_BASE, PORT_COUNT, Uart16550
from vmmswap.vm.machine import Machine
from vmmswap.vm.machine_state import (
    capture_devices,
    capture_vcpu,
    restore_devices,
    restore_vcpu,
    snapshot_msrs,
)
from vmmswap.vm.memtest.cpuid import set_memtest_cpuid
from vmmswap.vm.memtest.emulation import FinitFixup
from vmmswap.vm.memtest.guest import MemtestConfig, MemtestGuest
from vmmswap.vm.restore import CONNECT_TIMEOUT_S, eager_load, hand_over
from vmmswap.vm.snapshot import (
    MEMORY_FILE,
    STATE_FILE,
    SnapshotError,
    SnapshotInfo,
    write_memory_file,
)
from vmmswap.vm.vm_state import VcpuState, VmState, VmStateError, save_state

GUEST_KIND: Final = "vmmswap-memtest"


def snapshot_memtest(guest: MemtestGuest, directory: str | os.PathLike[str]) -> SnapshotInfo:
    """Pause memtest wherever it is, write ``directory``/{vmstate.json, memory}, resume it."""
    memory = guest.memory
    if registered_ranges((r.host_addr, r.host_addr + r.size) for r in memory.regions):
        raise SnapshotError("memtest's memory is registered with userfaultfd (vmm-swap "
                            "enabled?): pages not in memory would be read as zeros")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    machine = guest.machine
    xsave_size = machine.vm.xsave_size()
    msrs = snapshot_msrs(machine)
    started = time.monotonic()
    vcpus = machine.pause(lambda v: capture_vcpu(v, xsave_size=xsave_size, msrs=msrs,
                                                 lapic=True))
    try:
        clock, chips, pit = capture_devices(machine.vm, irqchip=True, pit=True)
        regions, data = write_memory_file(memory, out / MEMORY_FILE)
        config = guest.config
        meta = {"kind": GUEST_KIND, "memory_size": config.memory_size,
                "vcpus": config.vcpus, "cmdline": config.cmdline, "uart": guest.uart.state(),
                "output": base64.b64encode(guest.output()).decode("ascii")}
        save_state(str(out / STATE_FILE), VmState(
            regions=regions, vcpus=[v for v in vcpus if isinstance(v, VcpuState)],
            page_size=memory.page_size, clock_ns=clock, tsc_khz=machine.tsc_khz,
            irqchips=chips, pit=pit, guest=meta))
        pause = time.monotonic() - started
    finally:
        machine.resume()
    return SnapshotInfo(out / STATE_FILE, out / MEMORY_FILE, memory.size, data, pause)


class RestoredMemtest(MemtestGuest):
    """memtest brought back from :func:`snapshot_memtest`; the same API as
    :class:`~vmmswap.vm.memtest.guest.MemtestGuest` (``start``, ``screen``, ``press``...).
    Exactly one of ``handler_socket`` (lazy) and ``mem_file`` (eager) is given."""

    def __init__(self, state: VmState, *, handler_socket: str | None = None,
                 mem_file: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        if (handler_socket is None) == (mem_file is None):
            raise ValueError("give exactly one of handler_socket (lazy) or mem_file (eager)")
        meta = state.guest
        if meta.get("kind") != GUEST_KIND:
            raise VmStateError(f"the snapshot is of {meta.get('kind')!r}, not memtest")
        try:
            self.config = MemtestConfig(int(meta["memory_size"]), int(meta["vcpus"]),
                                        str(meta["cmdline"]))
            output = base64.b64decode(str(meta["output"]), validate=True)
            uart_state = dict(meta["uart"])
        except (KeyError, TypeError, ValueError) as err:
            raise VmStateError(f"malformed memtest snapshot: {err}") from None
        self.state = state
        self._lock = threading.Lock()
        self._output = bytearray(output)
        self.started_at: float | None = None
        self._uffd: Userfaultfd | None = None
        self._sock: socket.socket | None = None
        self.memory = GuestMemory.create([(r.guest_addr, r.size) for r in state.regions],
                                         name="restored memtest")
        try:
            self.machine = Machine(self.memory, vcpus=self.config.vcpus, irqchip=True,
                                   pit=True)
            self.uart = Uart16550(self._on_output, self._set_uart_irq, COM1_BASE)
            self.uart.load_state(uart_state)
            self.machine.add_io_device(COM1_BASE, PORT_COUNT, self.uart)
            set_memtest_cpuid(self.machine.kvm, self.machine.vcpus)
            self.fixup = FinitFixup()
            self.fixup.install(self.machine.vcpus)
            if handler_socket is not None:
                self._uffd, self._sock = hand_over(self.memory, state, handler_socket,
                                                   connect_timeout)
            else:
                assert mem_file is not None
                eager_load(self.memory, state, mem_file)
            restore_devices(self.machine.vm, clock_ns=state.clock_ns,
                            irqchips=state.irqchips, pit=state.pit)
            xsave_size = self.machine.vm.xsave_size()
            for vcpu, vstate in zip(self.machine.vcpus, state.vcpus, strict=True):
                restore_vcpu(vcpu, vstate, xsave_size=xsave_size)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop memtest, tell the handler to exit (close the socket), free memory."""
        if hasattr(self, "machine"):
            self.machine.close()
            if self.machine.running:
                return  # a vCPU stuck in a fault: leave memory and uffd to process exit
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None
        self.memory.close()
