"""A guardian that thaws the frozen VMM tree if the monitor dies while it is frozen.

Why: ``enable`` stops the VMM and its devices with SIGSTOP, then moves guest memory. If the
monitor is killed in between, nobody is left to send SIGCONT and the VM hangs, stopped, with no
one told. The guardian is a tiny process of its own (not a thread: it must outlive the monitor)
that holds a pidfd for every process the monitor is about to stop. The monitor writes to a pipe
whose only write end it owns; end of file on that pipe means the monitor is gone, and any process
still on the list gets SIGCONT. The pidfds make the signal exact even if a pid is reused.

This file runs as a script (``python -I -S thaw_guard.py``) and imports only the standard
library, so the guardian starts in milliseconds and never imports the package. The monitor side
is :class:`ThawGuard`.

The pipe protocol, one line each: ``+PID`` (about to stop PID), ``-`` (everything thawed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

_log = logging.getLogger(__name__)


class ThawGuard:
    """The monitor's handle on the guardian process. Every method is best effort: a guard that
    cannot be told anything only loses the extra safety, never the freeze itself."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._pipe: IO[bytes] | None = proc.stdin

    @classmethod
    def start(cls) -> ThawGuard | None:
        """Start the guardian; None (with a warning) when it cannot be started."""
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(Path(__file__).resolve())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True)
        except OSError as err:
            _log.warning("no thaw guard (a killed monitor would leave the VMM stopped): %s", err)
            return None
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Still running and still listening (else the monitor starts a new one)."""
        return self._pipe is not None and self._proc.poll() is None

    def _send(self, line: str) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
        except (OSError, ValueError) as err:
            _log.warning("the thaw guard is gone: %s", err)
            self._pipe = None

    def will_stop(self, pid: int) -> None:
        """Call *before* SIGSTOP: a monitor killed right after the signal is covered too."""
        self._send(f"+{pid}")

    def thawed(self) -> None:
        self._send("-")

    def close(self) -> None:
        """Stop the guardian: with nothing frozen, end of file makes it exit quietly."""
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --- the guardian process -------------------------------------------------------------------------
def _guard(stream: IO[bytes]) -> None:
    frozen: dict[int, int] = {}  # pid -> pidfd
    for raw in stream:
        line = raw.strip()
        if line.startswith(b"+"):
            pid = int(line[1:])
            if pid not in frozen:
                with contextlib.suppress(OSError):  # already gone: nothing to resume
                    frozen[pid] = os.pidfd_open(pid)
        elif line == b"-":
            for fd in frozen.values():
                os.close(fd)
            frozen.clear()
    # End of file: the monitor is gone. Whatever it left stopped, resume.
    for pidfd in frozen.values():
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)


def _main() -> int:
    # Outlive the monitor when a terminal's ^C or ^\ reaches the whole process group.
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    os.setsid()
    _guard(sys.stdin.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
