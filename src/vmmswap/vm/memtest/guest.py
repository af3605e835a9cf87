"""memtest86+ on its own micro-VM: memory, the in-kernel irqchip and PIT, a 16550 on COM1.

:class:`MemtestGuest` writes the image, zero page, command line, boot GDT, identity page tables
and MP table into guest memory *before* any vCPU runs (and before vmm-swap registers the memory);
afterwards it only exchanges bytes with memtest over the UART (its screen out, keys in), so the
VMM's Python code never faults on swapped guest memory.

memtest refuses less than 64 MiB of RAM, which is also the layout's minimum. ``nobench nosm``
keep out its x87 memory benchmark (PVM does not emulate x87) and SMBIOS probing; ``nosmp`` keeps
it on the boot CPU (dropped with more than one vCPU); ``nobigstatus`` avoids the full-screen pass
banner.

With more than one vCPU every local APIC is software-enabled (SVR 0x1FF) before the first
instruction, as a BIOS leaves it: KVM resets SVR to 0xFF (disabled), and memtest's SMP start then
never gets past its first screen clear (measured: 10 bytes of output, then nothing for 40 s).
With SVR 0x1FF it starts the AP through the MP table and runs both ("SMP: 2T (PAR)").
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import kvm as k
from vmmswap.vm.linux import bootparams as layout
from vmmswap.vm.linux.entry import gdt_bytes, identity_page_tables, setup_boot_vcpu
from vmmswap.vm.linux.mptable import build_mptable
from vmmswap.vm.linux.serial import COM1_BASE, COM1_IRQ, PORT_COUNT, Uart16550
from vmmswap.vm.machine import Machine
from vmmswap.vm.memtest.cpuid import set_memtest_cpuid
from vmmswap.vm.memtest.emulation import FinitFixup
from vmmswap.vm.memtest.image import entry_point, load_image
from vmmswap.vm.memtest.screen import Screen

DEFAULT_CMDLINE = "console=ttyS0,115200 nobench nosm nobigstatus nosmp"
#: The command line with more than one vCPU: memtest's SMP on.
SMP_CMDLINE = DEFAULT_CMDLINE.removesuffix(" nosmp")


@dataclass(frozen=True)
class MemtestConfig:
    memory_size: int = 64 * layout.MIB
    vcpus: int = 1
    cmdline: str = DEFAULT_CMDLINE

    @classmethod
    def smp(cls, vcpus: int) -> MemtestConfig:
        """``vcpus`` vCPUs, with memtest's SMP on when there is more than one."""
        return cls(vcpus=vcpus, cmdline=DEFAULT_CMDLINE if vcpus == 1 else SMP_CMDLINE)


class MemtestGuest:
    """memtest86+ booted through the 64-bit boot protocol (see the module docstring)."""

    def __init__(self, image_path: Path, config: MemtestConfig | None = None) -> None:
        self.config = config if config is not None else MemtestConfig()
        layout.check_memory_size(self.config.memory_size)
        self.image = load_image(image_path)
        self._lock = threading.Lock()
        self._output = bytearray()
        self.started_at: float | None = None
        self.memory = GuestMemory.create([(0, self.config.memory_size)], name="memtest guest")
        try:
            self.machine = Machine(self.memory, vcpus=self.config.vcpus, irqchip=True, pit=True)
            try:
                self.uart = Uart16550(self._on_output, self._set_uart_irq, COM1_BASE)
                self.machine.add_io_device(COM1_BASE, PORT_COUNT, self.uart)
                set_memtest_cpuid(self.machine.kvm, self.machine.vcpus)
                self.fixup = FinitFixup()
                self.fixup.install(self.machine.vcpus)
                self._load()
                if self.config.vcpus > 1:
                    self._enable_lapics()
            except BaseException:
                self.machine.close()
                raise
        except BaseException:
            self.memory.close()
            raise

    def _load(self) -> None:
        size = self.config.memory_size
        image = self.image
        load_at = int(image.header.code32_start)
        if load_at + image.init_size > size:
            raise ValueError(f"memtest needs up to {load_at + image.init_size:#x}, past the "
                             f"guest's {size // layout.MIB} MiB")
        cmdline = layout.encode_cmdline(self.config.cmdline, image.cmdline_limit)
        zero_page = layout.build_zero_page(image, cmdline_addr=layout.CMDLINE_ADDR,
                                           initrd_addr=0, initrd_size=0,
                                           e820=layout.e820_map(size))
        memory = self.memory
        memory.write(layout.GDT_ADDR, gdt_bytes())
        memory.write(layout.PAGE_TABLES_ADDR, identity_page_tables(layout.PAGE_TABLES_ADDR))
        memory.write(layout.ZERO_PAGE_ADDR, zero_page)
        memory.write(layout.CMDLINE_ADDR, cmdline)
        memory.write(layout.MPTABLE_ADDR, build_mptable(layout.MPTABLE_ADDR, self.config.vcpus))
        layout.write_sparse(memory, load_at, image.protected_mode)
        setup_boot_vcpu(self.machine.vcpus[0], entry_point(image), layout.ZERO_PAGE_ADDR)

    def _enable_lapics(self) -> None:
        for vcpu in self.machine.vcpus:
            regs = bytearray(vcpu.get_lapic())
            svr = struct.unpack_from("<I", regs, k.APIC_SVR_OFFSET)[0]
            struct.pack_into("<I", regs, k.APIC_SVR_OFFSET, svr | k.APIC_SVR_ENABLE)
            vcpu.set_lapic(bytes(regs))

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.machine.start()

    def _set_uart_irq(self, level: bool) -> None:
        self.machine.irq_line(COM1_IRQ, int(level))

    def _on_output(self, data: bytes) -> None:
        with self._lock:
            self._output += data

    def output(self) -> bytes:
        """Every byte memtest wrote to its serial console so far."""
        with self._lock:
            return bytes(self._output)

    def screen(self) -> Screen:
        """memtest's screen as drawn so far."""
        screen = Screen()
        screen.feed(self.output())
        return screen

    def press(self, keys: str) -> None:
        """Type ``keys`` on the console (memtest polls the UART for them)."""
        self.uart.feed(keys.encode("ascii"))

    def raise_if_failed(self) -> None:
        """Re-raise a vCPU failure (triple fault, KVM error) instead of waiting on."""
        for record in self.machine.exits:
            if record.error is not None:
                raise RuntimeError(f"memtest's vCPU failed: {record.error}") from record.error

    # --- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        self.machine.close()
        if not self.machine.running:
            self.memory.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
