"""The micro-VM: guest memory, a :class:`Machine`, the built-in guest and its devices, assembled.

Order matters for vmm-swap, and this class keeps it: guest memory is created first (so a
:class:`~vmmswap.control.controller.SwapController` can be launched on it before any vCPU runs), the
program, GDT and page tables are written while nothing is registered with userfaultfd, and from
:meth:`MicroVM.start` on the VMM's Python code never touches guest memory again -- the guest is
driven through port I/O only (:class:`~vmmswap.vm.workload.Workload`).
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Self

from vmmswap.dataplane.guest_memory import Backing, GuestMemory
from vmmswap.vm import guest_abi as abi
from vmmswap.vm import layout as lay
from vmmswap.vm.balloon import BalloonDevice
from vmmswap.vm.devices import DebugConsole
from vmmswap.vm.guest_build import GuestProgram, build_guest
from vmmswap.vm.kvm import Kvm
from vmmswap.vm.longmode import enter_long_mode, write_long_mode_tables
from vmmswap.vm.machine import Machine
from vmmswap.vm.workload import Workload, WorkloadDevice

_log = logging.getLogger(__name__)

MIB = 1 << 20


class MicroVM:
    """A KVM guest running the built-in workload, ready to be put under vmm-swap.

    ``memory_size`` bytes of RAM in ``regions`` regions (see :class:`~vmmswap.vm.layout.
    GuestLayout`), ``vcpus`` vCPUs. Attributes: ``layout``, ``memory`` (the GuestMemory to hand
    to the swap controller), ``machine``, ``workload``, ``balloon``, ``console``. ``backing``
    chooses what backs guest memory (:class:`~vmmswap.dataplane.guest_memory.Backing`: 2 MiB
    hugetlbfs pages need that many free in the kernel's pool).
    """

    def __init__(self, memory_size: int = 1024 * MIB, *, vcpus: int = 2, regions: int = 2,
                 program: GuestProgram | None = None, kvm: Kvm | None = None,
                 backing: Backing = Backing.SMALL) -> None:
        if not 1 <= vcpus <= lay.MAX_VCPUS:
            raise ValueError(f"the built-in guest supports 1 to {lay.MAX_VCPUS} vCPUs")
        self.layout = lay.GuestLayout.for_size(memory_size, regions)
        self.program = program if program is not None else build_guest()
        self.memory = GuestMemory.create(list(self.layout.regions), name="micro-vm guest",
                                         backing=backing)
        try:
            self.machine = Machine(self.memory, vcpus=vcpus, kvm=kvm)
            self._load()
            self.device = WorkloadDevice(self.machine, vcpus)
            self.machine.add_io_device(abi.WORKLOAD_PORT_BASE, self.device.port_count,
                                       self.device)
            self.balloon = BalloonDevice(self.memory, self.layout)
            self.machine.add_io_device(abi.BALLOON_PORT, abi.BALLOON_PORT_COUNT, self.balloon)
            self.console = DebugConsole()
            self.machine.add_io_device(abi.DEBUG_CONSOLE_PORT, 1, self.console)
            self.workload = Workload(self.device, self.machine, self.layout)
        except BaseException:
            if hasattr(self, "machine"):
                self.machine.close()
            self.memory.close()
            raise
        self._started = False

    def _load(self) -> None:
        # Safety: nothing is registered with userfaultfd yet and no vCPU has run; these ranges
        # belong to the system area the workload never touches as data.
        if len(self.program.binary) > lay.PROGRAM_MAX_SIZE:
            raise ValueError("guest program too large")
        self.tables = write_long_mode_tables(
            self.memory, gdt_addr=lay.GDT_ADDR, page_tables_addr=lay.PAGE_TABLES_ADDR,
            map_limit=self.layout.map_limit, user=True, tss_addr=lay.TSS_ADDR,
            kernel_stacks=[lay.kernel_stack_top(i) for i in range(len(self.machine.vcpus))])
        if lay.PAGE_TABLES_ADDR + (self.layout.map_limit >> 18) + 2 * 4096 > lay.PAGE_TABLES_END:
            raise ValueError("guest memory map too large for the page-table area")
        self.memory.write(self.program.load_addr, self.program.binary)
        for vcpu in self.machine.vcpus:
            enter_long_mode(vcpu, self.tables, rip=self.program.entry,
                            rsp=lay.kernel_stack_top(vcpu.index),
                            args=(vcpu.index, lay.user_stack_top(vcpu.index)))

    @property
    def vcpus(self) -> int:
        return len(self.machine.vcpus)

    @property
    def tsc_khz(self) -> int:
        return self.machine.tsc_khz

    def start(self) -> None:
        """Start the vCPUs; from now on only the guest touches guest memory."""
        self.machine.start()
        self._started = True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Clean shutdown: every vCPU acknowledges EXIT and halts."""
        if self._started and self.machine.running:
            self.workload.exit(timeout)

    def close(self) -> None:
        """Stop the machine (forcibly if needed) and free guest memory."""
        self.machine.close()
        if not self.machine.running:
            self.memory.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
