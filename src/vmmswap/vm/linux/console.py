"""The host's end of the guest's serial console: collect lines, wait for the guest's answers.

Bytes arrive from the UART on vCPU threads; complete lines are stored with the time they
arrived (for boot timing) and handed to an optional echo callback. The guest's protocol lines
(``VMMSWAP-...``, see ``init.sh``) can be interleaved with kernel messages on the same physical
line, so a protocol line is recognised wherever its tag starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

TAG = "VMMSWAP-"


@dataclass(frozen=True)
class ConsoleLine:
    index: int
    time: float  # time.monotonic() when the newline arrived
    text: str

    @property
    def message(self) -> str | None:
        """The guest protocol message on this line (``"PONG 3"``, ...), or None."""
        at = self.text.find(TAG)
        return None if at < 0 else self.text[at + len(TAG):].strip()


class ConsoleClosedError(EOFError):
    """The guest stopped (or the console was closed) before the awaited line came."""


class Console:
    """Line-buffered console output with waiting for a matching line (thread-safe)."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self._echo = echo
        self._cond = threading.Condition()
        self._partial = bytearray()
        self._lines: list[ConsoleLine] = []
        self._closed = ""

    def write(self, data: bytes) -> None:
        """Console output from the guest (the UART's ``on_output``)."""
        finished: list[ConsoleLine] = []
        with self._cond:
            self._partial += data
            while (end := self._partial.find(b"\n")) >= 0:
                raw = bytes(self._partial[:end]).rstrip(b"\r")
                del self._partial[:end + 1]
                line = ConsoleLine(len(self._lines), time.monotonic(),
                                   raw.decode("utf-8", "replace"))
                self._lines.append(line)
                finished.append(line)
            if finished:
                self._cond.notify_all()
        if self._echo is not None:
            for line in finished:
                self._echo(line.text)

    def close(self, reason: str) -> None:
        """Wake every waiter: no more lines will come."""
        with self._cond:
            self._closed = reason or "console closed"
            self._cond.notify_all()

    @property
    def lines(self) -> list[ConsoleLine]:
        with self._cond:
            return list(self._lines)

    def text(self) -> str:
        """Everything received so far, including an unfinished last line."""
        with self._cond:
            tail = bytes(self._partial).decode("utf-8", "replace")
            return "".join(line.text + "\n" for line in self._lines) + tail

    def __len__(self) -> int:
        with self._cond:
            return len(self._lines)

    def wait_for(self, match: Callable[[ConsoleLine], bool], *, start: int = 0,
                 timeout: float) -> ConsoleLine:
        """The first line from index ``start`` on that ``match`` accepts.

        Raises TimeoutError after ``timeout`` seconds, ConsoleClosedError if the console was
        closed first; both messages end with the last console lines, for diagnosis.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            at = start
            while True:
                while at < len(self._lines):
                    line = self._lines[at]
                    if match(line):
                        return line
                    at += 1
                if self._closed:
                    raise ConsoleClosedError(f"{self._closed}{self._tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching console line within {timeout} s"
                                       f"{self._tail()}")
                self._cond.wait(remaining)

    def wait_for_message(self, prefix: str, *, start: int = 0, timeout: float) -> ConsoleLine:
        """The first guest message starting with ``prefix`` (e.g. ``"PONG 3"``)."""
        def match(line: ConsoleLine) -> bool:
            message = line.message
            return message is not None and (message == prefix or message.startswith(prefix + " "))
        return self.wait_for(match, start=start, timeout=timeout)

    def _tail(self, count: int = 15) -> str:
        last = [line.text for line in self._lines[-count:]]
        return ("; last console lines:\n    " + "\n    ".join(last)) if last else ""
