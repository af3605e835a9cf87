"""End to end: Debian's kernel boots on the micro-VM and its memory survives vmm-swap.

Mirrors crosvm's vmm-swap e2e check: the guest writes random data to tmpfs and prints its
sha256; the host runs enable -> trim -> out -> disable, asking for the digest after each step
and pinging the console while swap is Active. The digest must never change, with two vCPUs both
re-reading the data, and the console must answer while Active.

Skips (with the reason) when /dev/kvm is absent, when the images are not in the cache
(``bash scripts/fetch-linux-guest.sh``), or on a software KVM (PVM) unless
``VMMSWAP_LINUX_E2E=1``: PVM emulates guest kernel code (the boot takes ~8 minutes) and does
not deliver the guest's system calls, so init cannot run there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmswap.control.controller import SwapController
from vmmswap.control.status import SwapState
from vmmswap.vm.kvm import kvm_flavour, kvm_unavailable_reason
from vmmswap.vm.linux.demo import PVM_LIMITATION
from vmmswap.vm.linux.guest import GuestImages, LinuxGuest, LinuxGuestConfig, find_images
from vmmswap.vm.linux.session import Timeouts, run_swap_cycle

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

FORCE_ENV = "VMMSWAP_LINUX_E2E"


def _images() -> GuestImages:
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs a usable /dev/kvm: {reason}")
    if kvm_flavour() == "kvm_pvm" and os.environ.get(FORCE_ENV) != "1":
        pytest.skip(f"{PVM_LIMITATION} (set {FORCE_ENV}=1 to try anyway)")
    try:
        return find_images()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def guest_under_swap() -> Iterator[tuple[LinuxGuest, SwapController]]:
    images = _images()
    config = LinuxGuestConfig(memory_size=256 << 20, vcpus=2, data_mb=8, period=2)
    guest = LinuxGuest(images, config)
    controller: SwapController | None = None
    with tempfile.TemporaryDirectory(prefix="vmmswap-linux-e2e-") as swap_dir:
        try:
            controller = SwapController.launch(guest.memory, Path(swap_dir))
            guest.start()
            yield guest, controller
        finally:
            guest.machine.close()
            if controller is not None:
                controller.close()
            guest.close()


@pytest.mark.timeout(3600)
def test_sha256_survives_swap_cycle_with_two_vcpus(
        guest_under_swap: tuple[LinuxGuest, SwapController]) -> None:
    guest, controller = guest_under_swap
    limits = Timeouts.for_guest(guest)
    ready = guest.wait_ready(limits.boot)
    assert ready.cpus == 2, f"the guest brought up {ready.cpus} CPUs, expected 2"

    result = run_swap_cycle(guest, controller, timeouts=limits)

    states = {step.name: step.state for step in result.steps}
    assert states["swap out"] == SwapState.ACTIVE
    assert states["active"] == SwapState.ACTIVE
    assert states["disable"] == SwapState.READY
    # The console answered while Active: ping times exist for both Active steps.
    assert all(step.ping is not None for step in result.steps
               if step.name in ("swap out", "active"))
    # vCPU 1 re-read the data on its own at least once, vCPU 0 at every step.
    assert result.periodic_digests, "vCPU 1 never re-read the data (no PERIODIC line)"
    assert result.consistent, f"guest data changed across the swap cycle: {result.digests}"
    guest.power_off(limits.command)
