"""Shared test set-up: markers and skips that every area's tests use."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from huge_settings import HugeSettings


def kvm_unavailable_reason() -> str | None:
    """Why KVM tests cannot run here, or None when they can."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent (no KVM on this machine)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def huge_settings() -> Iterator[HugeSettings]:
    """Shmem THP mode and hugetlb reservations for one test, restored afterwards."""
    with HugeSettings() as settings:
        yield settings
