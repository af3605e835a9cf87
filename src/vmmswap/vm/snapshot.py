"""Snapshot a running micro-VM: its state file and a memory file in Firecracker's layout.

The vCPUs are paused at their safe point -- each parked on its own thread at the built-in
guest's command port, after every command queued before has finished
(:meth:`~vmmswap.vm.workload.WorkloadDevice.park`) -- and each captures its own registers
there. While they stay parked nothing changes guest memory (the guest has no interrupt sources
and the VMM's devices only act on guest requests), so memory is then copied to the memory file
and the state file written; the vCPUs are released when both are on disk, and the guest runs on
as if nothing happened.

The memory file is guest memory region after region, no header, as Firecracker writes it and
``vmmswap serve-snapshot`` (or any Firecracker page-fault handler) reads it. Pages that are
holes in the guest's memfds (never written) or all zero are left as holes, so the file is
sparse: a 4 GiB guest that used 300 MiB takes 300 MiB of disk.

Guest memory is read with ``pread`` on the region memfds -- copies made by the kernel, holes
skipped via SEEK_DATA so they are never allocated. Snapshot a guest that is not under vmm-swap
(its memfds then hold every page).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from vmmswap.dataplane.guest_memory import GuestMemory, data_ranges
from vmmswap.kernel.kvm import KvmRegs
from vmmswap.vm import guest_abi as abi
from vmmswap.vm import layout as lay
from vmmswap.vm.machine_state import capture_devices, capture_vcpu, snapshot_msrs
from vmmswap.vm.micro import MicroVM
from vmmswap.vm.vm_state import MemoryRegionState, VcpuState, VmState, save_state

STATE_FILE: Final = "vmstate.json"
MEMORY_FILE: Final = "memory"
GUEST_KIND: Final = "vmmswap-micro-vm"
_CHUNK: Final = 8 << 20
_PAGE: Final = 4096
_PARK_TIMEOUT_S: Final = 60.0


class SnapshotError(RuntimeError):
    """The snapshot could not be taken; the guest keeps running, no state file is written."""


@dataclass
class SnapshotInfo:
    """What a snapshot wrote."""

    state_path: Path
    memory_path: Path
    memory_size: int
    data_bytes: int  # bytes of the memory file that are data, not holes
    pause_s: float  # how long the vCPUs stayed parked


def _check_parked(state: VcpuState, program_end: int) -> None:
    """The vCPU must sit at its command port's ``in %dx, %eax`` (see the module docstring)."""
    regs = KvmRegs.from_buffer_copy(state.regs)
    port = abi.WORKLOAD_PORT_BASE + state.index * abi.PORT_STRIDE + abi.PORT_CMD
    if (regs.rdx & 0xFFFF) != port or not lay.PROGRAM_ADDR <= regs.rip < program_end:
        raise SnapshotError(f"vCPU {state.index} is not parked at its command port (rip "
                            f"{regs.rip:#x}, dx {regs.rdx & 0xFFFF:#x}, want {port:#x})")


def write_memory_file(memory: GuestMemory, path: Path) -> tuple[list[MemoryRegionState], int]:
    """Copy guest memory into a sparse Firecracker memory file; (regions, data bytes)."""
    regions: list[MemoryRegionState] = []
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        buf = bytearray(_CHUNK)
        for region in memory.regions:
            regions.append(MemoryRegionState(region.guest_addr, region.size, offset))
            for start, end in data_ranges(region.memfd, region.size):
                for pos in range(start, end, _CHUNK):
                    length = min(_CHUNK, end - pos)
                    view = memoryview(buf)[:length]
                    if os.preadv(region.memfd, [view], pos) != length:
                        raise SnapshotError(f"short read of guest memory at {pos:#x}")
                    written += _write_nonzero(fd, view, offset + pos)
            offset += region.size
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return regions, written


def _write_nonzero(fd: int, view: memoryview, file_pos: int) -> int:
    """Write the pages of ``view`` that are not all zero, in runs; the rest stays a hole."""
    pages = np.frombuffer(view, dtype=np.uint64).reshape(-1, _PAGE // 8)
    nonzero = pages.any(axis=1)
    if not nonzero.any():
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], nonzero.astype(np.int8), [0]))))
    written = 0
    for lo, hi in zip(edges[::2], edges[1::2], strict=True):
        a, b = int(lo) * _PAGE, int(hi) * _PAGE
        os.pwrite(fd, view[a:b], file_pos + a)
        written += b - a
    return written


def snapshot_micro_vm(vm: MicroVM, directory: str | os.PathLike[str], *,
                      guest: dict[str, Any] | None = None) -> SnapshotInfo:
    """Pause ``vm``'s vCPUs at their safe point, write ``directory``/{vmstate.json, memory},
    resume them. ``guest`` is stored in the state file for whoever restores (checksums)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    machine = vm.machine
    xsave_size = machine.vm.xsave_size()
    msrs = snapshot_msrs(machine)
    parks = [vm.device.park(i, lambda i: capture_vcpu(
        machine.vcpus[i], xsave_size=xsave_size, msrs=msrs, lapic=machine.irqchip))
        for i in range(vm.vcpus)]
    started = time.monotonic()
    try:
        for park in parks:
            if not park.parked.wait(max(0.0, started + _PARK_TIMEOUT_S - time.monotonic())):
                raise SnapshotError(f"vCPUs did not reach their safe point within "
                                    f"{_PARK_TIMEOUT_S:g} s (a command still running?)")
            if park.error is not None:
                raise SnapshotError(f"capturing a vCPU failed: {park.error}") from park.error
        vcpus = [park.result for park in parks]
        program_end = vm.program.load_addr + len(vm.program.binary)
        for state in vcpus:
            assert isinstance(state, VcpuState)
            _check_parked(state, program_end)
        clock, chips, pit = capture_devices(machine.vm, irqchip=machine.irqchip,
                                            pit=machine.pit)
        memory_path = out / MEMORY_FILE
        regions, data = write_memory_file(vm.memory, memory_path)
        meta = {"kind": GUEST_KIND, **(guest or {})}
        state_path = out / STATE_FILE
        save_state(str(state_path), VmState(
            regions=regions, vcpus=[s for s in vcpus if isinstance(s, VcpuState)],
            page_size=vm.memory.page_size, clock_ns=clock, tsc_khz=machine.tsc_khz,
            irqchips=chips, pit=pit, guest=meta))
        pause = time.monotonic() - started
    finally:
        for park in parks:
            park.release.set()
    return SnapshotInfo(state_path, memory_path, vm.memory.size, data, pause)
