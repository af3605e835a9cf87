"""The Linux guest under vmm-swap: crosvm's e2e check, and boot-time measurements.

:func:`run_swap_cycle` drives enable -> trim -> out -> disable while the guest runs, asking the
guest after each step to re-read its tmpfs data and print the sha256 (the digest must never
change) and pinging its console while swap is Active (the guest must keep running).
:func:`measure_boot` boots a guest and times it to init, optionally with every loaded page
swapped out before the first instruction, so that the boot reads them back from the swap file.

The VMM's Python code never touches guest memory here: boot images are written before the
controller registers guest memory, and every exchange with the guest is port I/O.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmmswap.control.controller import SwapController
from vmmswap.control.status import SwapState, SwapStatus
from vmmswap.vm.linux.guest import GuestImages, LinuxGuest, LinuxGuestConfig, ReadyInfo

Report = Callable[[str], None]


@dataclass(frozen=True)
class Step:
    """One step of the cycle: the swap state after it, the guest's digest, the ping time."""

    name: str
    state: str
    seconds: float
    digest: str | None = None
    ping: float | None = None
    pages: int = 0


@dataclass
class CycleResult:
    initial_digest: str
    steps: list[Step] = field(default_factory=list)
    periodic_digests: list[str] = field(default_factory=list)

    @property
    def digests(self) -> list[str]:
        """Every digest the guest printed: initial, after each step, and periodic ones."""
        seen = [self.initial_digest]
        seen += [s.digest for s in self.steps if s.digest is not None]
        return seen + self.periodic_digests

    @property
    def consistent(self) -> bool:
        return len(set(self.digests)) == 1


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for the guest; software KVM (PVM) needs far longer than hardware."""

    boot: float = 120.0
    command: float = 60.0
    swap: float = 120.0

    @classmethod
    def for_guest(cls, guest: LinuxGuest) -> Timeouts:
        return cls(boot=1800.0, command=600.0, swap=600.0) if guest.software_kvm else cls()


def _state(status: SwapStatus) -> str:
    return str(status.state)


def run_swap_cycle(guest: LinuxGuest, controller: SwapController, *,
                   timeouts: Timeouts | None = None, report: Report | None = None) -> CycleResult:
    """enable -> check -> trim -> check -> out -> ping/check while Active -> disable -> check.

    The guest must be running and have printed its initial digest; ``controller`` must have
    been launched for ``guest.memory`` before the guest started.
    """
    limits = timeouts if timeouts is not None else Timeouts.for_guest(guest)
    say = report if report is not None else (lambda _: None)
    result = CycleResult(guest.initial_digest(limits.boot))
    say(f"initial sha256 {result.initial_digest}")

    def step(name: str, action: Callable[[], SwapStatus], *, ping: bool = False) -> Step:
        start = time.monotonic()
        status = action()
        seconds = time.monotonic() - start
        latency = guest.ping(limits.command) if ping else None
        digest = guest.check(limits.command)
        done = Step(name, _state(status), seconds, digest, latency,
                    int(status.state_transition.pages))
        result.steps.append(done)
        extra = f", console ping {latency * 1000:.0f} ms" if latency is not None else ""
        say(f"{name}: {done.state} in {seconds:.2f} s ({done.pages} pages){extra}; "
            f"guest sha256 {digest}")
        return done

    step("enable", controller.enable)
    step("trim", lambda: controller.trim(wait=True, timeout=limits.swap))
    out = step("swap out", lambda: controller.swap_out(wait=True, timeout=limits.swap), ping=True)
    if out.state != SwapState.ACTIVE:
        raise RuntimeError(f"swap out ended in state {out.state}, expected Active")
    # A second round trip while Active: pages the first one faulted in are resident again,
    # the rest of the guest still comes from the swap file.
    step("active", controller.status, ping=True)
    step("disable", lambda: controller.disable(wait=True, timeout=limits.swap))
    result.periodic_digests = guest.periodic_digests()
    return result


@dataclass(frozen=True)
class BootMeasurement:
    swapped: bool
    ready: ReadyInfo
    pages_swapped_out: int = 0


def measure_boot(images: GuestImages, config: LinuxGuestConfig, *, swap_dir: Path | None,
                 echo: Report | None = None, report: Report | None = None) -> BootMeasurement:
    """Boot to init and power off; with ``swap_dir``, guest memory is swapped out first.

    With swap, the images are loaded, vmm-swap is enabled and everything is written to the
    swap file (state Active) before the first vCPU runs: every page the boot reads is then
    faulted back from the file (with readahead).
    """
    say = report if report is not None else (lambda _: None)
    guest = LinuxGuest(images, config, echo=echo)
    controller: SwapController | None = None
    pages = 0
    try:
        limits = Timeouts.for_guest(guest)
        if swap_dir is not None:
            controller = SwapController.launch(guest.memory, os.fspath(swap_dir))
            controller.enable()
            controller.trim(wait=True, timeout=limits.swap)
            status = controller.swap_out(wait=True, timeout=limits.swap)
            pages = int(status.state_transition.pages)
            say(f"swapped out {pages} pages before boot: {_state(status)}")
        guest.start()
        ready = guest.wait_ready(limits.boot)
        say(f"boot to init {'with' if controller else 'without'} swap: {ready.seconds:.2f} s "
            f"(guest uptime {ready.uptime:.2f} s, {ready.cpus} CPUs)")
        guest.initial_digest(limits.boot)
        guest.power_off(limits.command)
        if controller is not None:
            controller.disable(wait=True, timeout=limits.swap)
        return BootMeasurement(controller is not None, ready, pages)
    finally:
        guest.machine.close()
        if controller is not None:
            controller.close()
        guest.close()
