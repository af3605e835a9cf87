"""Boot Debian's Linux kernel with the project's initramfs on the micro-VM, and talk to it.

:class:`LinuxGuest` owns the guest memory (one memfd region from guest address 0), a
:class:`~vmmswap.vm.machine.Machine` with KVM's in-kernel irqchip and PIT, a 16550A console on
COM1 and the power-off port. It writes the boot images into guest memory *before* any vCPU runs
and never reads or writes guest memory afterwards: the console and power-off are port I/O exits,
so a guest whose memory is under vmm-swap is driven without the VMM's Python code touching it.

The images come from ``scripts/fetch-linux-guest.sh`` (see :func:`find_images`).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.vm.kvm import kvm_flavour
from vmmswap.vm.linux import bootparams as layout
from vmmswap.vm.linux.bzimage import BzImage
from vmmswap.vm.linux.console import Console, ConsoleLine
from vmmswap.vm.linux.cpuid import set_guest_cpuid
from vmmswap.vm.linux.elf import KernelElf
from vmmswap.vm.linux.emulation import EmulationFixups
from vmmswap.vm.linux.entry import gdt_bytes, identity_page_tables, setup_boot_vcpu
from vmmswap.vm.linux.mptable import build_mptable
from vmmswap.vm.linux.power import PowerOffDevice
from vmmswap.vm.linux.serial import COM1_BASE, COM1_IRQ, PORT_COUNT, Uart16550
from vmmswap.vm.machine import Machine

KERNEL_NAME = "bzImage"
#: How often a wait for the guest checks that its vCPUs are still running.
_POLL_SECONDS = 0.5
INITRD_NAME = "initramfs.cpio.gz"

#: What the guest needs and nothing it would probe for in vain: no ACPI (the MP table describes
#: the CPUs), no PCI, no PS/2 controller, the console on COM1, and a triple fault on panic
#: (reboot=t with panic=-1), which the machine reports as an error.
BASE_CMDLINE = (
    "console=ttyS0 reboot=t panic=-1 acpi=off pci=off nokaslr 8250.nr_uarts=1 "
    "i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable no_timer_check "
    "init_on_alloc=0 cryptomgr.notests"
)
#: On PVM, guest kernel code is emulated by KVM's instruction emulator, which lacks XSAVE,
#: POPCNT, RDRAND, SSE beyond plain moves, AVX and more; PVM passes the host's CPUID bits for
#: them through regardless of KVM_SET_CPUID2, so the kernel is told not to use them (its SIMD
#: crypto, e.g. the BLAKE2s behind /dev/urandom, falls back to generic C). Every emulated
#: instruction costs about a microsecond, hence ``mitigations=off`` (no retpolines),
#: ``rodata=off`` (no W+X page-table walk at the end of boot, and no read-only kernel text for
#: the emulator's hypercall patching to fault on), ``nopvspin`` (no kick hypercalls) and no
#: watchdogs or RCU stall reports, which the slowness would trigger.
PVM_CMDLINE = (
    "noxsave nosmap nopcid mitigations=off nowatchdog rodata=off nopvspin "
    "rcupdate.rcu_cpu_stall_suppress=1 "
    "clearcpuid=popcnt,rdrand,rdseed,avx,avx2,fma,smap,fsgsbase,pku,rdpid,bmi1,bmi2,movbe,"
    "invpcid,pni,ssse3,sse4_1,sse4_2,pclmulqdq,aes,sha_ni,f16c,avx512f,gfni,vaes,vpclmulqdq"
)


def cache_dir() -> Path:
    """Where ``scripts/fetch-linux-guest.sh`` leaves the kernel and initramfs."""
    configured = os.environ.get("VMMSWAP_LINUX_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vmmswap" / "linux"


@dataclass(frozen=True)
class GuestImages:
    kernel: Path
    initrd: Path


def find_images(directory: Path | None = None) -> GuestImages:
    """The cached kernel and initramfs; FileNotFoundError saying how to fetch them."""
    where = directory if directory is not None else cache_dir()
    images = GuestImages(where / KERNEL_NAME, where / INITRD_NAME)
    missing = [p for p in (images.kernel, images.initrd) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Linux guest images missing ({', '.join(str(p) for p in missing)}): run "
            "`bash scripts/fetch-linux-guest.sh` (needs apt-get and Debian's package lists)"
        )
    return images


@dataclass(frozen=True)
class LinuxGuestConfig:
    """``data_mb`` of random data go into tmpfs; ``period`` > 0 re-hashes them every that many
    seconds on vCPU 1 without being asked; ``verbose`` keeps the kernel's boot log on."""

    memory_size: int = 256 * layout.MIB
    vcpus: int = 2
    data_mb: int = 32
    period: int = 0
    verbose: bool = True
    extra_cmdline: str = ""

    def cmdline(self, power_off_port: int, software_kvm: bool = False) -> str:
        words = [BASE_CMDLINE]
        if software_kvm:
            words.append(PVM_CMDLINE)
        if not self.verbose:
            words.append("quiet")
        words.append(f"vmmswap_mb={self.data_mb} vmmswap_period={self.period} "
                     f"vmmswap_port={power_off_port}")
        if self.extra_cmdline:
            words.append(self.extra_cmdline)
        return " ".join(words)


@dataclass(frozen=True)
class ReadyInfo:
    """Init started: ``seconds`` from vCPU start to its first line, ``uptime`` as the guest
    counted it, ``cpus`` online."""

    seconds: float
    uptime: float
    cpus: int


@dataclass
class _Counters:
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class LinuxGuest:
    """A Linux guest on its own :class:`Machine` (see the module docstring)."""

    def __init__(self, images: GuestImages, config: LinuxGuestConfig | None = None, *,
                 echo: Callable[[str], None] | None = None) -> None:
        self.config = config if config is not None else LinuxGuestConfig()
        layout.check_memory_size(self.config.memory_size)
        self.image = BzImage.load(images.kernel)
        self.kernel = KernelElf.parse(self.image.vmlinux())
        self.initrd = images.initrd.read_bytes()
        self.console = Console(echo)
        self.power = PowerOffDevice(self._on_power_off)
        self.software_kvm = kvm_flavour() == "kvm_pvm"
        self.fixups = EmulationFixups()
        self.cmdline = self.config.cmdline(self.power.port, self.software_kvm)
        self._counters = _Counters()
        self._send_lock = threading.Lock()
        self.started_at: float | None = None
        self.memory = GuestMemory.create([(0, self.config.memory_size)], name="linux guest")
        try:
            self.machine = Machine(self.memory, vcpus=self.config.vcpus, irqchip=True, pit=True)
            try:
                self.uart = Uart16550(self.console.write, self._set_uart_irq, COM1_BASE)
                self.machine.add_io_device(COM1_BASE, PORT_COUNT, self.uart)
                self.machine.add_io_device(self.power.port, 1, self.power)
                set_guest_cpuid(self.machine.kvm, self.machine.vcpus)
                self.fixups.install(self.machine.vcpus)
                self._load()
            except BaseException:
                self.machine.close()
                raise
        except BaseException:
            self.memory.close()
            raise

    # --- boot ---------------------------------------------------------------------------------

    def _load(self) -> None:
        """Write every boot image into guest memory (before the vCPUs and before vmm-swap).

        The kernel goes in as the uncompressed ELF (see :meth:`BzImage.vmlinux`), entered at
        ``startup_64`` under the 64-bit boot protocol; its all-zero pages are not written, so
        guest memory stays sparse.
        """
        size = self.config.memory_size
        if self.kernel.end > size:
            raise ValueError(f"the kernel ends at {self.kernel.end:#x}, past the guest's "
                             f"{size // layout.MIB} MiB")
        cmdline = layout.encode_cmdline(self.cmdline, self.image.cmdline_limit)
        initrd_addr = layout.initrd_address(self.kernel.end, int(self.image.header.initrd_addr_max),
                                            size, len(self.initrd))
        zero_page = layout.build_zero_page(
            self.image, cmdline_addr=layout.CMDLINE_ADDR, initrd_addr=initrd_addr,
            initrd_size=len(self.initrd), e820=layout.e820_map(size),
        )
        memory = self.memory
        memory.write(layout.GDT_ADDR, gdt_bytes())
        memory.write(layout.PAGE_TABLES_ADDR, identity_page_tables(layout.PAGE_TABLES_ADDR))
        memory.write(layout.ZERO_PAGE_ADDR, zero_page)
        memory.write(layout.CMDLINE_ADDR, cmdline)
        memory.write(layout.MPTABLE_ADDR, build_mptable(layout.MPTABLE_ADDR, self.config.vcpus))
        for segment in self.kernel.segments:
            layout.write_sparse(memory, segment.paddr, segment.data)
        memory.write(initrd_addr, self.initrd)
        setup_boot_vcpu(self.machine.vcpus[0], self.kernel.entry, layout.ZERO_PAGE_ADDR)

    def start(self) -> None:
        """Start the vCPUs; the boot vCPU enters the kernel, the others wait for its SIPI."""
        self.started_at = time.monotonic()
        self.machine.start()

    def _set_uart_irq(self, level: bool) -> None:
        self.machine.irq_line(COM1_IRQ, int(level))

    def _on_power_off(self, value: int) -> None:
        self.machine.request_stop(f"guest powered off ({value:#x})")
        self.console.close("the guest powered off")

    # --- talking to init ------------------------------------------------------------------------

    def send(self, line: str) -> None:
        """Type ``line`` on the guest's console."""
        with self._send_lock:
            self.uart.feed(line.encode("ascii") + b"\n")

    def wait_ready(self, timeout: float = 60.0) -> ReadyInfo:
        """Wait for init's first line; the boot time is measured from :meth:`start`."""
        line = self._wait("READY", timeout)
        assert self.started_at is not None
        fields = dict(word.split("=", 1) for word in (line.message or "").split()[1:]
                      if "=" in word)
        return ReadyInfo(line.time - self.started_at, float(fields.get("uptime", "nan")),
                         int(fields.get("cpus", "0")))

    def initial_digest(self, timeout: float = 60.0) -> str:
        """The sha256 init printed right after writing its data to tmpfs."""
        return self._digest_of(self._wait("SHA256 initial", timeout))

    def ping(self, timeout: float = 30.0) -> float:
        """Round trip of a console ping, in seconds: proof the guest is running."""
        sequence = next(self._counters.sequence)
        start = len(self.console)
        sent = time.monotonic()
        self.send(f"ping {sequence}")
        line = self._wait(f"PONG {sequence}", timeout, start)
        return line.time - sent

    def check(self, timeout: float = 60.0) -> str:
        """Ask init to re-read its data and return the sha256 it printed."""
        sequence = next(self._counters.sequence)
        start = len(self.console)
        self.send(f"check {sequence}")
        return self._digest_of(self._wait(f"SHA256 {sequence}", timeout, start))

    def periodic_digests(self) -> list[str]:
        """Every ``PERIODIC`` digest init printed so far (vCPU 1's re-reads)."""
        digests = []
        for line in self.console.lines:
            message = line.message
            if message is not None and message.startswith("PERIODIC "):
                digests.append(message.split()[-1])
        return digests

    def power_off(self, timeout: float = 30.0) -> None:
        """Ask init to power off and wait for the machine to stop."""
        self.send("poweroff")
        if not self.power.wait(timeout):
            raise TimeoutError(f"the guest did not power off within {timeout} s"
                               f"{self._console_tail()}")
        self.machine.join(timeout)

    def _wait(self, prefix: str, timeout: float, start: int = 0) -> ConsoleLine:
        """Wait for a guest message, but give up as soon as the vCPUs have stopped."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_failed()
            if not self.machine.running and not self.power.powered_off:
                raise RuntimeError(f"the guest stopped ({self.machine.stop_reason or 'halted'}) "
                                   f"before printing {prefix!r}{self._console_tail()}")
            remaining = deadline - time.monotonic()
            try:
                return self.console.wait_for_message(
                    prefix, start=start, timeout=max(0.0, min(remaining, _POLL_SECONDS)))
            except TimeoutError:
                if remaining <= _POLL_SECONDS:
                    raise TimeoutError(f"the guest did not print {prefix!r} within {timeout} s"
                                       f"{self._console_tail()}") from None
            except EOFError:
                self._raise_if_failed()
                raise

    @staticmethod
    def _digest_of(line: ConsoleLine) -> str:
        digest = (line.message or "").split()[-1]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"guest printed a malformed sha256: {line.text!r}")
        return digest

    def _raise_if_failed(self) -> None:
        """Re-raise a vCPU failure (triple fault, KVM error) instead of waiting on."""
        if self.started_at is None:
            raise RuntimeError("the guest was not started")
        for record in self.machine.exits:
            if record.error is not None:
                raise RuntimeError(f"the guest failed: {record.error}"
                                   f"{self._console_tail()}") from record.error

    def _console_tail(self, count: int = 20) -> str:
        lines = self.console.lines[-count:]
        return ("; last console lines:\n    " + "\n    ".join(line.text for line in lines)
                if lines else "")

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the vCPUs, then release guest memory (the machine must be gone first)."""
        self.console.close("the guest was closed")
        self.machine.close()
        if not self.machine.running:
            self.memory.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
