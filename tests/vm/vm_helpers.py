"""Helpers shared by the micro-VM tests (a uniquely named module, unlike conftest)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from vmmswap.vm.kvm import kvm_unavailable_reason

MIB = 1 << 20

KVM_REASON = kvm_unavailable_reason()

F = TypeVar("F", bound=Callable[..., object])

_skip_without_kvm = pytest.mark.skipif(KVM_REASON is not None,
                                       reason=f"needs a usable /dev/kvm: {KVM_REASON}")


def needs_kvm(fn: F) -> F:
    """Mark a test ``kvm`` and skip it, saying why, where /dev/kvm is not usable."""
    marked: F = pytest.mark.kvm(_skip_without_kvm(fn))
    return marked
