"""The guest's way to power off: one I/O port; any byte written to it stops the machine.

Without ACPI, Linux's ``poweroff`` has no firmware to call and only halts, so the guest's init
writes to this port through ``/dev/port`` instead (see ``init.sh``). The written value is kept as
the guest's exit code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

#: The port init writes to. Nothing on a PC decodes it; QEMU's debug-exit device uses it too.
POWER_OFF_PORT: Final = 0x501


class PowerOffDevice:
    """Calls ``on_power_off(value)`` once, on the first write to :attr:`port`."""

    def __init__(self, on_power_off: Callable[[int], None], port: int = POWER_OFF_PORT) -> None:
        self.port = port
        self._on_power_off = on_power_off
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.value: int | None = None

    @property
    def powered_off(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the guest powered off (True) or ``timeout`` passed (False)."""
        return self._event.wait(timeout)

    def io_in(self, port: int, size: int) -> int:
        return 0

    def io_out(self, port: int, size: int, value: int) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.value = value
            self._event.set()
        self._on_power_off(value)
