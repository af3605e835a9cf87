"""What the VMM's side of vmm-swap raises, and why.

One family (:class:`SwapError`) so that a VMM can catch every vmm-swap failure at once, split by
what the caller can do about it: a command invalid in this state changed nothing
(:class:`SwapStateError`); a valid command that failed left the state the status names
(:class:`SwapFailedError`); a monitor that is gone for good (:class:`MonitorDiedError`) means
swapped-out pages are out of reach and the VM must stop.
"""

from __future__ import annotations

from typing import Final

from vmmswap.control.protocol import ErrorKind, Response
from vmmswap.control.status import SwapStatus


class SwapError(RuntimeError):
    """Base of the controller's errors; ``status`` is the monitor's status when it had one."""

    def __init__(self, message: str, status: SwapStatus | None = None) -> None:
        super().__init__(message)
        self.status = status


class SwapStateError(SwapError):
    """The command is not valid in the current state; nothing changed."""


class SwapFailedError(SwapError):
    """The command was valid but failed (the state says what is left: Failed or unchanged)."""


class SwapRequestError(SwapError):
    """The monitor refused the request itself (a bug on this side or a version mismatch)."""


class MonitorDiedError(SwapError):
    """The monitor process is gone and no successor took over (the restart policy gave up,
    or the successor could not resume the page state).

    If vmm-swap was enabled, guest pages that were in staging or the swap file are out of
    reach: every thread that touches one blocks for good (it is never handed a zero page). The
    VM cannot continue; stop it and start it again (from a snapshot if you have one). Threads
    that only touch resident pages keep running.
    """


class MonitorRestartedError(SwapFailedError):
    """The monitor died while running this command and a successor took over; ``status`` is
    the successor's, and the message says what became of the command (an enable is reported
    interrupted, never redone behind the caller's back: it would stop the VM again)."""


_ERRORS: Final[dict[ErrorKind, type[SwapError]]] = {
    ErrorKind.STATE: SwapStateError,
    ErrorKind.FAILED: SwapFailedError,
    ErrorKind.REQUEST: SwapRequestError,
    ErrorKind.PERMISSION: SwapRequestError,
    ErrorKind.BUSY: SwapFailedError,
}


def raise_for(response: Response) -> Response:
    """``response`` if it is a success, else the matching :class:`SwapError`."""
    if response.ok:
        return response
    cls = _ERRORS.get(response.error or ErrorKind.FAILED, SwapFailedError)
    raise cls(response.message, response.status)


def describe_exit(code: int | None) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    return "is gone" if code is None else (
        f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
