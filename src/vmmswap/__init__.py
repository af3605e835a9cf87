"""vmm-swap for Python.

A virtual machine's guest memory is moved out of RAM -- first to staging memory, then to a swap
file -- and brought back page by page, on demand, through Linux userfaultfd, while the guest keeps
running. See DESIGN.md for the layer map.

This module is the package's face: the names a user starts from, so that ``from vmmswap import
SwapController`` works. They are loaded on first use (PEP 562), so that ``python -m
vmmswap.control.monitor`` or a tool importing only ``vmmswap.kernel`` does not pay for the
whole stack. Layers, lower never importing higher:

* ``vmmswap.kernel``    the kernel ABI (constants, structs, ioctls, libc);
* ``vmmswap.uffd``      the seed's ``Userfaultfd`` wrapper, events, errors, mappings, page math;
* ``vmmswap.dataplane`` guest memory, staging, the swap file, the page handler and its work;
* ``vmmswap.control``   the monitor process, ``SwapController``, the protocol and state machine;
* ``vmmswap.cli`` and ``vmmswap.vm`` on top: the command line and the KVM micro-VM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "Userfaultfd": "vmmswap.uffd.userfaultfd",
    "UffdFillError": "vmmswap.uffd.errors",
    "UffdPermissionError": "vmmswap.uffd.errors",
    "GuestMemory": "vmmswap.dataplane.guest_memory",
    "SwapMetrics": "vmmswap.dataplane.metrics",
    "SwapController": "vmmswap.control.controller",
    "SwapError": "vmmswap.control.errors",
    "SwapStateError": "vmmswap.control.errors",
    "SwapFailedError": "vmmswap.control.errors",
    "SwapRequestError": "vmmswap.control.errors",
    "MonitorDiedError": "vmmswap.control.errors",
    "MonitorRestartedError": "vmmswap.control.errors",
    "SwapState": "vmmswap.control.status",
    "SwapStatus": "vmmswap.control.status",
}

__all__ = [
    "GuestMemory",
    "MonitorDiedError",
    "MonitorRestartedError",
    "SwapController",
    "SwapError",
    "SwapFailedError",
    "SwapMetrics",
    "SwapRequestError",
    "SwapState",
    "SwapStateError",
    "SwapStatus",
    "UffdFillError",
    "UffdPermissionError",
    "Userfaultfd",
    "__version__",
]

if TYPE_CHECKING:
    from vmmswap.control.controller import SwapController
    from vmmswap.control.errors import (
        MonitorDiedError,
        MonitorRestartedError,
        SwapError,
        SwapFailedError,
        SwapRequestError,
        SwapStateError,
    )
    from vmmswap.control.status import SwapState, SwapStatus
    from vmmswap.dataplane.guest_memory import GuestMemory
    from vmmswap.dataplane.metrics import SwapMetrics
    from vmmswap.uffd.errors import UffdFillError, UffdPermissionError
    from vmmswap.uffd.userfaultfd import Userfaultfd


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmmswap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
