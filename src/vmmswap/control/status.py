"""What ``vmmswap status`` reports: crosvm's ``SwapState``, ``SwapMetrics``, ``SwapStateTransition``
and ``SwapStatus``, with the same JSON shape.

The JSON is crosvm's (``{"state": "Pending", "metrics": {seven counters}, "state_transition":
{"pages": N, "time_ms": M}}``) so tools written for ``crosvm swap status`` read it unchanged.
What this project reports beyond crosvm goes under keys crosvm does not have (``readahead``,
``devices``, ``error``), never inside crosvm's objects.

Parsing is strict: the CLI prints what the monitor says, and a status that does not parse means
the two sides disagree about the protocol, which must be an error rather than a guess.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Final

from vmmswap.dataplane.dirty import TrackingStats
from vmmswap.dataplane.metrics import (
    CROSVM_METRICS,
    READAHEAD_METRICS,
    StatusFormatError,
    SwapMetrics,
    parse_object,
    parse_u64,
)
from vmmswap.uffd.pagesize import PAGE_SIZE


class SwapState(enum.StrEnum):
    """The state of vmm-swap; the string value is crosvm's serialised name.

    ``code`` is crosvm's ``#[repr(C)]`` discriminant (Ready 0, Failed 1, Pending 2, ...), for
    callers that exchange numbers with crosvm's C API.
    """

    READY = "Ready"
    FAILED = "Failed"
    PENDING = "Pending"
    TRIM_IN_PROGRESS = "TrimInProgress"
    SWAP_OUT_IN_PROGRESS = "SwapOutInProgress"
    ACTIVE = "Active"
    SWAP_IN_IN_PROGRESS = "SwapInInProgress"
    # crosvm's own member names, as aliases (``SwapState.Ready is SwapState.READY``).
    Ready = "Ready"
    Failed = "Failed"
    Pending = "Pending"
    TrimInProgress = "TrimInProgress"
    SwapOutInProgress = "SwapOutInProgress"
    Active = "Active"
    SwapInInProgress = "SwapInInProgress"

    @property
    def code(self) -> int:
        """crosvm's numeric value of the state."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> SwapState:
        """The state with crosvm's numeric value ``code``; ValueError if there is none."""
        for state, value in _CODES.items():
            if value == code:
                return state
        raise ValueError(f"no swap state has crosvm code {code!r}")

    @property
    def enabled(self) -> bool:
        """Whether guest memory is under vmm-swap (every state but Ready)."""
        return self is not SwapState.READY

    @property
    def in_progress(self) -> bool:
        """Whether a background operation (trim, out, swap-in) is running."""
        return self in (SwapState.TRIM_IN_PROGRESS, SwapState.SWAP_OUT_IN_PROGRESS,
                        SwapState.SWAP_IN_IN_PROGRESS)


_CODES: Final[dict[SwapState, int]] = {
    SwapState.READY: 0,
    SwapState.FAILED: 1,
    SwapState.PENDING: 2,
    SwapState.TRIM_IN_PROGRESS: 3,
    SwapState.SWAP_OUT_IN_PROGRESS: 4,
    SwapState.ACTIVE: 5,
    SwapState.SWAP_IN_IN_PROGRESS: 6,
}

@dataclass(frozen=True, slots=True)
class SwapStateTransition:
    """The last (or running) state transition: pages it handled and how long it took.

    By state: Pending → the enable (pages moved) or the last trim (pages trimmed);
    SwapOutInProgress/Active → the out so far; SwapInInProgress/Ready → the last disable;
    Failed → empty.
    """

    pages: int = 0
    time_ms: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"pages": self.pages, "time_ms": self.time_ms}

    @classmethod
    def from_dict(cls, value: Any) -> SwapStateTransition:
        value = parse_object(value, "state_transition")
        if set(value) != {"pages", "time_ms"}:
            raise StatusFormatError(
                f"state_transition must have exactly pages and time_ms, got {sorted(value)}")
        return cls(parse_u64(value["pages"], "state_transition.pages"),
                   parse_u64(value["time_ms"], "state_transition.time_ms"))


@dataclass(frozen=True, slots=True)
class SwapStatus:
    """A snapshot of the monitor: crosvm's three fields plus this project's extras.

    ``devices`` counts the device processes whose uffds the monitor serves besides the VMM's;
    ``error`` says why the state is Failed (or what last went wrong), None when nothing did.
    ``restarts`` counts the monitors that took over from a killed one (this VMM's lifetime);
    ``last_resume_seconds`` is the last such take-over's time from the death to the successor
    serving faults (0.0 before the first).
    """

    state: SwapState
    metrics: SwapMetrics = field(default_factory=SwapMetrics)
    state_transition: SwapStateTransition = field(default_factory=SwapStateTransition)
    devices: int = 0
    error: str | None = None
    restarts: int = 0
    last_resume_seconds: float = 0.0
    #: How long the last enable kept the VMM and its devices frozen (0.0 before the first).
    frozen_seconds: float = 0.0
    #: Dirty tracking across cycles (see vmmswap.dataplane.dirty): its mode and counters.
    dirty_tracking: TrackingStats = field(default_factory=TrackingStats)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: crosvm's keys first, then this project's."""
        return {
            "state": str(self.state),
            "metrics": self.metrics.crosvm_dict(),
            "state_transition": self.state_transition.to_dict(),
            "readahead": self.metrics.readahead_dict(),
            "devices": self.devices,
            "error": self.error,
            "page_size": self.metrics.page_size,
            "restarts": self.restarts,
            "last_resume_seconds": self.last_resume_seconds,
            "frozen_seconds": self.frozen_seconds,
            "dirty_tracking": self.dirty_tracking.to_dict(),
        }

    def to_json(self) -> str:
        """One line of JSON, like ``crosvm swap status`` prints."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, value: Any) -> SwapStatus:
        value = parse_object(value, "status")
        known = {"state", "metrics", "state_transition", "readahead", "devices", "error",
                 "page_size", "restarts", "last_resume_seconds", "frozen_seconds",
                 "dirty_tracking"}
        extra = sorted(set(value) - known)
        if extra:
            raise StatusFormatError(f"status: unexpected keys {extra}")
        for key in ("state", "metrics", "state_transition"):
            if key not in value:
                raise StatusFormatError(f"status: missing {key!r}")
        state = value["state"]
        if not isinstance(state, str) or state not in _BY_NAME:
            raise StatusFormatError(f"status: unknown state {state!r}; expected one of "
                                    f"{sorted(_BY_NAME)}")
        error = value.get("error")
        if error is not None and not isinstance(error, str):
            raise StatusFormatError(f"status: error must be a string or null, got {error!r}")
        page_size = parse_u64(value.get("page_size", PAGE_SIZE), "page_size")
        if page_size < PAGE_SIZE or page_size & (page_size - 1):
            raise StatusFormatError(f"status: page_size must be a power of two of at least "
                                    f"{PAGE_SIZE}, got {page_size}")
        return cls(
            state=_BY_NAME[state],
            metrics=SwapMetrics.from_dicts(value["metrics"], value.get("readahead"), page_size),
            state_transition=SwapStateTransition.from_dict(value["state_transition"]),
            devices=parse_u64(value.get("devices", 0), "devices"),
            error=error,
            restarts=parse_u64(value.get("restarts", 0), "restarts"),
            last_resume_seconds=_parse_seconds(value.get("last_resume_seconds", 0.0),
                                               "last_resume_seconds"),
            frozen_seconds=_parse_seconds(value.get("frozen_seconds", 0.0), "frozen_seconds"),
            dirty_tracking=TrackingStats.from_dict(value.get("dirty_tracking")),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SwapStatus:
        """Parse :meth:`to_json` output (or crosvm's, which lacks the extra keys)."""
        try:
            value = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise StatusFormatError(f"status is not valid JSON: {err}") from None
        return cls.from_dict(value)


_BY_NAME: Final[dict[str, SwapState]] = {str(s): s for s in SwapState}


def _parse_seconds(value: Any, what: str) -> float:
    """A finite, non-negative number of seconds (JSON int or float)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0.0 <= float(value) < 1e9):
        raise StatusFormatError(f"{what} must be a number of seconds, got {value!r}")
    return float(value)

__all__ = [
    "CROSVM_METRICS",
    "READAHEAD_METRICS",
    "StatusFormatError",
    "SwapMetrics",
    "SwapState",
    "SwapStateTransition",
    "SwapStatus",
]
