"""Adaptive spinning on the uffds after a fault, so the next fault skips an idle CPU's wake-up.

Why: on this project's nested hosts a fault served by a handler that sleeps in ``epoll_wait``
on the *other* CPU costs ~77 µs, almost all of it waking that idle CPU; the same fault on a
handler that is already running costs a fraction of that. Faults come in bursts (a guest
resuming from idle touches page after page), so after serving one the monitor keeps polling
its uffds without blocking for a short *window*: a fault arriving meanwhile is served by a
running CPU. Each fault served restarts the window; when none comes for a whole window the
monitor goes back to blocking. An idle monitor therefore never spins (0 % CPU): spinning only
ever follows a fault, and costs at most one window per burst.

The window adapts like an adaptive mutex: a spin that caught a fault doubles it (up to
``max_window``), one that caught nothing halves it (down to ``min_window``), so a monitor that
sees only isolated faults wastes little CPU per fault. A spin also stops after ``max_spin`` in
total, so a continuous fault stream cannot starve the monitor's other duties (control clients,
stuck-fault retries): the monitor's loop runs a round and, with faults pending, comes back at
once.

Nothing here touches guest memory or decides how a fault is served: ``poll`` does that (the
monitor's non-blocking drain of every uffd), so correctness is exactly the non-spinning loop's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

#: Defaults, in seconds. The window must exceed one fault round trip on a running handler
#: (~15-25 µs here) so that back-to-back faults are caught; the cap bounds a round.
DEFAULT_MIN_WINDOW: Final = 20e-6
DEFAULT_MAX_WINDOW: Final = 200e-6
DEFAULT_START_WINDOW: Final = 100e-6
DEFAULT_MAX_SPIN: Final = 2e-3


@dataclass
class SpinStats:
    """What spinning did since the monitor started (the benchmark reads it)."""

    spins: int = 0          # spins started (one per round that served a fault)
    caught: int = 0         # faults served while spinning (each one a wake-up saved)
    idle_polls: int = 0     # polls that found nothing
    seconds: float = 0.0    # wall time spent spinning (CPU time: the monitor is single-threaded)


@dataclass
class AdaptiveSpin:
    """The spinning policy. ``clock`` is injectable so tests need no timing."""

    min_window: float = DEFAULT_MIN_WINDOW
    max_window: float = DEFAULT_MAX_WINDOW
    window: float = DEFAULT_START_WINDOW
    max_spin: float = DEFAULT_MAX_SPIN
    clock: Callable[[], float] = time.perf_counter
    stats: SpinStats = field(default_factory=SpinStats)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_window <= self.max_window:
            raise ValueError(f"need 0 <= min_window <= max_window, got {self.min_window} and "
                             f"{self.max_window}")
        if self.max_spin < 0.0:
            raise ValueError(f"max_spin must not be negative, got {self.max_spin}")
        self.window = min(max(self.window, self.min_window), self.max_window)

    @property
    def enabled(self) -> bool:
        return self.max_window > 0.0 and self.max_spin > 0.0

    def spin(self, poll: Callable[[], int]) -> int:
        """Call ``poll`` (serve whatever is pending without blocking; return how many faults it
        served) until a whole window passes without a fault or ``max_spin`` is spent; returns
        the faults served. Call it only right after serving a fault."""
        if not self.enabled:
            return 0
        clock = self.clock
        start = now = clock()
        deadline = start + self.window
        stop = start + self.max_spin
        caught = idle = 0
        while now < deadline and now < stop:
            served = poll()
            now = clock()
            if served:
                caught += served
                deadline = now + self.window
            else:
                idle += 1
        self.window = (min(self.window * 2.0, self.max_window) if caught
                       else max(self.window / 2.0, self.min_window))
        stats = self.stats
        stats.spins += 1
        stats.caught += caught
        stats.idle_polls += idle
        stats.seconds += now - start
        return caught

    @classmethod
    def disabled(cls) -> AdaptiveSpin:
        """A policy that never spins (the monitor's behaviour before spinning existed)."""
        return cls(min_window=0.0, max_window=0.0, window=0.0, max_spin=0.0)
