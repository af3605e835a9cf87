"""Small port-I/O devices any guest may use: a debug console and an exit port."""

from __future__ import annotations

import logging
import threading

from vmmswap.vm.machine import Machine

_log = logging.getLogger(__name__)


class DebugConsole:
    """Port 0xE9 (the bochs/QEMU convention): bytes written become log lines."""

    def __init__(self, name: str = "guest") -> None:
        self._name = name
        self._line = bytearray()
        self._lock = threading.Lock()
        self.lines: list[str] = []

    def io_in(self, port: int, size: int) -> int:
        return 0xE9  # what bochs answers, so a guest can detect the port

    def io_out(self, port: int, size: int, value: int) -> None:
        with self._lock:
            byte = value & 0xFF
            if byte == 0x0A:
                line = self._line.decode(errors="replace")
                self.lines.append(line)
                _log.info("%s: %s", self._name, line)
                self._line.clear()
            else:
                self._line.append(byte)


class ExitPort:
    """Any write stops the machine cleanly, with the value as the exit code."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.code: int | None = None

    def io_in(self, port: int, size: int) -> int:
        return 0

    def io_out(self, port: int, size: int, value: int) -> None:
        self.code = value
        self._machine.request_stop(f"guest wrote exit code {value} to port {port:#x}")
