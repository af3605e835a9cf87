"""Shared fixtures for the micro-VM tests: KVM availability and small guests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vm_helpers import KVM_REASON, MIB

from vmmswap.vm.guest_build import GuestBuildError, GuestProgram, build_guest
from vmmswap.vm.micro import MicroVM


@pytest.fixture(scope="session")
def guest_program() -> GuestProgram:
    try:
        return build_guest()
    except GuestBuildError as exc:
        pytest.skip(f"cannot build the built-in guest: {exc}")


@pytest.fixture
def micro_vm(guest_program: GuestProgram) -> Iterator[MicroVM]:
    """A started 64 MiB, 2-vCPU, 2-region guest (no swap), shut down afterwards."""
    if KVM_REASON is not None:
        pytest.skip(f"needs a usable /dev/kvm: {KVM_REASON}")
    vm = MicroVM(64 * MIB, vcpus=2, regions=2, program=guest_program)
    vm.start()
    try:
        yield vm
    finally:
        vm.close()
