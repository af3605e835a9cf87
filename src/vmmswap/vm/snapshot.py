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
skipped via SEEK_DATA so they are never allocated. A full snapshot needs every page in its
memfd, so it is refused while guest memory is registered with userfaultfd (vmm-swap enabled,
or a lazy restore); a diff snapshot of a lazily restored VM reads only pages the guest wrote,
which are in memory, and must not be taken under vmm-swap (its pages may be swapped out).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from vmmswap.control.monitor_launch import registered_ranges
from vmmswap.dataplane.guest_memory import GuestMemory, data_ranges
from vmmswap.kernel.kvm import KvmRegs
from vmmswap.snapshot.working_set import save_working_set
from vmmswap.vm import guest_abi as abi
from vmmswap.vm import layout as lay
from vmmswap.vm.machine import Machine
from vmmswap.vm.machine_state import capture_devices, capture_vcpu, snapshot_msrs
from vmmswap.vm.vm_state import MemoryRegionState, VcpuState, VmState, save_state
from vmmswap.vm.workload import WorkloadDevice

STATE_FILE: Final = "vmstate.json"
MEMORY_FILE: Final = "memory"
DIFF_FILE: Final = "memory.diff"
DIFF_PAGES_FILE: Final = "diff_pages.npy"
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


class SnapshottableVM(Protocol):
    """What a snapshot needs of a VM: :class:`~vmmswap.vm.micro.MicroVM` and
    :class:`~vmmswap.vm.restore.RestoredVM` both have it."""

    machine: Machine
    device: WorkloadDevice
    memory: GuestMemory

    @property
    def vcpus(self) -> int: ...


#: Reads the guest byte at a guest-physical address (where a swapped-out guest's program lies).
OpcodeReader = Callable[[int], int]
#: ``in %dx, %eax``: the instruction a parked vCPU's RIP must point at.
_IN_EAX_DX: Final = 0xED


def check_parked(state: VcpuState, program_end: int, memory: GuestMemory,
                 opcode_at: OpcodeReader | None = None) -> None:
    """The vCPU must sit *at* its command port's ``in %dx, %eax``, not yet executed (see the
    module docstring): RIP in the program, on that opcode (read by ``opcode_at``, default from
    the memfd with pread, a kernel copy; the identity map makes RIP a guest-physical address),
    DX the port."""
    regs = KvmRegs.from_buffer_copy(state.regs)
    port = abi.WORKLOAD_PORT_BASE + state.index * abi.PORT_STRIDE + abi.PORT_CMD
    opcode = -1
    if lay.PROGRAM_ADDR <= regs.rip < program_end:
        if opcode_at is not None:
            opcode = opcode_at(regs.rip)
        else:
            region = memory.region_of(regs.rip)
            opcode = os.pread(region.memfd, 1, regs.rip - region.guest_addr)[0]
    if (regs.rdx & 0xFFFF) != port or opcode != _IN_EAX_DX:
        raise SnapshotError(f"vCPU {state.index} is not parked at its command port's in "
                            f"(rip {regs.rip:#x}, opcode {opcode:#x}, dx {regs.rdx & 0xFFFF:#x},"
                            f" want {port:#x})")


def write_memory_file(memory: GuestMemory, path: Path) -> tuple[list[MemoryRegionState], int]:
    """Copy guest memory into a sparse Firecracker memory file; (regions, data bytes)."""
    regions = memory_regions(memory)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        buf = bytearray(_CHUNK)
        for region in memory.regions:
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


def write_diff_file(memory: GuestMemory, candidates: list[npt.NDArray[np.bool_]],
                    base_file: str, path: Path, pages_path: Path,
                    ) -> tuple[list[MemoryRegionState], int]:
    """A diff snapshot's memory: a full-size sparse memory file holding the pages that differ
    from the base memory file, among ``candidates`` (per region, one bool per 4 KiB page: the
    pages written or given back since the restore, a superset), and their page numbers.

    Comparing with the base makes the diff exact whatever the dirty log over-reports, and a
    page given back (a hole in the memfd now, reading as zeros) over non-zero base data is
    listed, so it reads as zeros after the next restore too."""
    regions: list[MemoryRegionState] = []
    listed: list[npt.NDArray[np.uint64]] = []
    data = 0
    base_fd = os.open(base_file, os.O_RDONLY | os.O_CLOEXEC)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        buf, old = bytearray(_CHUNK), bytearray(_CHUNK)
        for region, marks in zip(memory.regions, candidates, strict=True):
            regions.append(MemoryRegionState(region.guest_addr, region.size, offset))
            edges = np.flatnonzero(np.diff(np.concatenate(([0], marks.astype(np.int8), [0]))))
            for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                for pos in range(lo * _PAGE, hi * _PAGE, _CHUNK):
                    length = min(_CHUNK, hi * _PAGE - pos)
                    view, base_view = memoryview(buf)[:length], memoryview(old)[:length]
                    # pread of a memfd hole (a page given back) reads zeros, allocating
                    # nothing; a short read of the base means it is not this VM's base.
                    if os.preadv(region.memfd, [view], pos) != length or \
                            os.preadv(base_fd, [base_view], offset + pos) != length:
                        raise SnapshotError(f"short read at {pos:#x} (is {base_file} the "
                                            "base of this VM?)")
                    now = np.frombuffer(view, dtype=np.uint64).reshape(-1, _PAGE // 8)
                    was = np.frombuffer(base_view, dtype=np.uint64).reshape(-1, _PAGE // 8)
                    changed = np.flatnonzero((now != was).any(axis=1))
                    for page in changed.tolist():
                        chunk = view[page * _PAGE:(page + 1) * _PAGE]
                        data += _write_nonzero(fd, chunk, offset + pos + page * _PAGE)
                    listed.append(changed.astype(np.uint64) + np.uint64((offset + pos) // _PAGE))
            offset += region.size
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(base_fd)
    save_working_set(str(pages_path), np.concatenate(listed) if listed
                     else np.zeros(0, dtype=np.uint64))
    return regions, data


@dataclass
class HeldVcpus:
    """What :func:`held_vcpus` captured while every vCPU sits at its safe point."""

    vcpus: list[VcpuState]
    clock: Any
    chips: Any
    pit: Any
    #: ``time.monotonic()`` when the vCPUs were asked to park.
    started: float

    def check(self, memory: GuestMemory, opcode_at: OpcodeReader | None = None) -> None:
        """Each vCPU at its command port's ``in`` (see :func:`check_parked`)."""
        program_end = lay.PROGRAM_ADDR + lay.PROGRAM_MAX_SIZE
        for state in self.vcpus:
            check_parked(state, program_end, memory, opcode_at)

    def vm_state(self, vm: SnapshottableVM, regions: list[MemoryRegionState],
                 guest: dict[str, Any]) -> VmState:
        return VmState(regions=regions, vcpus=self.vcpus, page_size=vm.memory.page_size,
                       clock_ns=self.clock, tsc_khz=vm.machine.tsc_khz, irqchips=self.chips,
                       pit=self.pit, guest=guest)


@contextlib.contextmanager
def held_vcpus(vm: SnapshottableVM) -> Iterator[HeldVcpus]:
    """Park every vCPU at its safe point and capture its state and the devices'; release them
    when the block ends. A caller that stops the VM for good requests the machine's stop
    inside the block: released vCPUs then leave instead of running on."""
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
        states = [s for s in vcpus if isinstance(s, VcpuState)]
        assert len(states) == len(vcpus)
        clock, chips, pit = capture_devices(machine.vm, irqchip=machine.irqchip,
                                            pit=machine.pit)
        yield HeldVcpus(states, clock, chips, pit, started)
    finally:
        for park in parks:
            park.release.set()


def memory_regions(memory: GuestMemory) -> list[MemoryRegionState]:
    """The memory file's regions: ``memory``'s, back to back from offset 0 (Firecracker's)."""
    regions, offset = [], 0
    for region in memory.regions:
        regions.append(MemoryRegionState(region.guest_addr, region.size, offset))
        offset += region.size
    return regions


def snapshot_micro_vm(vm: SnapshottableVM, directory: str | os.PathLike[str], *,
                      guest: dict[str, Any] | None = None,
                      diff: list[npt.NDArray[np.bool_]] | None = None,
                      base: str | None = None) -> SnapshotInfo:
    """Pause ``vm``'s vCPUs at their safe point, write ``directory``/{vmstate.json, memory},
    resume them. ``guest`` is stored in the state file for whoever restores (checksums).

    A *diff* snapshot (``diff``: per region, the pages written since the restore from the full
    snapshot at ``base``) writes ``memory.diff`` and ``diff_pages.npy`` instead of ``memory``
    and names its base in the state file; it restores with the base's memory file underneath
    (``serve-snapshot --overlay``)."""
    if diff is None and registered_ranges((r.host_addr, r.host_addr + r.size)
                                          for r in vm.memory.regions):
        raise SnapshotError(
            "guest memory is registered with userfaultfd (vmm-swap enabled, or a lazy "
            "restore still serving it): pages not in memory would be read as zeros. Disable "
            "vmm-swap first, park it from the data plane (`vmmswap park --swapped`), or take "
            "a diff snapshot (--diff-snapshot) against the base")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with held_vcpus(vm) as held:
        held.check(vm.memory)
        meta = {"kind": GUEST_KIND, **(guest or {})}
        if diff is None:
            memory_path = out / MEMORY_FILE
            regions, data = write_memory_file(vm.memory, memory_path)
        else:
            if base is None:
                raise ValueError("a diff snapshot needs the base snapshot it overlays")
            memory_path = out / DIFF_FILE
            regions, data = write_diff_file(vm.memory, diff, str(Path(base) / MEMORY_FILE),
                                            memory_path, out / DIFF_PAGES_FILE)
            meta["base"] = str(Path(base).resolve())
        state_path = out / STATE_FILE
        save_state(str(state_path), held.vm_state(vm, regions, meta))
        pause = time.monotonic() - held.started
    return SnapshotInfo(state_path, memory_path, vm.memory.size, data, pause)
