"""A successor monitor taking over from a killed one: what it reads, what it does, in order.

The VMM holds every descriptor that says where guest data is (its uffd, the swap file, the
staging and page-state memfds, each device's uffd) and hands them to the successor. The
successor then:

1. reads the control area (:mod:`.restart_area`): the state machine's state and how far an
   enable got;
2. resumes the page handler over the page state (``PageHandler.resume``: O(mapping); it
   finishes or undoes the data-plane step the death interrupted) when swap was enabled;
3. registers the uffds when swap was enabled. Registrations belong to the uffd, which the VMM
   kept open, so they survived the death; registering a range again *with the same uffd* is a
   no-op in the kernel, which also completes a ``register_all`` the death cut short. When swap
   was *not* enabled (Ready, or an enable from Ready that had moved nothing), nothing is
   registered and a partial registration is undone instead: a blind re-register would make
   the successor answer faults in a state where none should arrive;
4. wakes every registered range of every uffd (``UFFDIO_WAKE``): a fault the dead monitor had
   read but not answered is no longer in the uffd's queue -- the kernel hands each fault out
   once -- and its thread sleeps until woken. Woken, it faults again and the new fault is read
   like any other;
5. resumes the interrupted command, or reports it as interrupted (see :func:`decide`).

The thaw guard of the dead monitor has already resumed a VMM tree frozen by an interrupted
enable; the successor never re-freezes on its own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmmswap.control.monitor_state import StateMachine
from vmmswap.control.restart_area import (
    FLAG_SLOW_CLEANUP,
    AreaRecord,
    EnablePhase,
    RestartArea,
)
from vmmswap.control.status import SwapState
from vmmswap.dataplane.guest_memory import RegionSpec

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerSetup:
    """What a page-handler factory gets: the received descriptors and whether to resume.

    ``staging_fd`` and ``state`` (the attached page state) are None when the VMM could not
    provide them (a data plane without persistent page state): such a handler cannot be
    resumed by a successor.
    """

    regions: Sequence[tuple[RegionSpec, int]]
    swap_fd: int
    readahead: bool
    staging_fd: int | None = None
    state: Any = None
    resume: bool = False
    #: Dirty tracking on (see vmmswap.dataplane.dirty): fills are write-protected.
    tracking: bool = False


class NotResumableError(RuntimeError):
    """The successor cannot take over the dead monitor's pages (no page state to resume)."""


@dataclass(frozen=True)
class Decision:
    """What the successor makes of the area: the state to serve in, whether a handler must
    be resumed, and what to report about the interrupted command."""

    state: SwapState
    needs_handler: bool
    register: bool
    note: str | None


def decide(record: AreaRecord) -> Decision:
    """The successor's plan for ``record``, per interrupted command:

    * **enable, before any page moved** (phase STARTING): reported as interrupted; the state
      is the one before it (a half-made registration from Ready is undone). Not redone: it
      would stop the VM again, which is the caller's decision.
    * **enable, during the move** (phase MOVING): reported as interrupted; state Pending. The
      pages moved stay in staging (served by faults), the rest stay resident: a consistent
      Pending. ``enable`` again moves the rest.
    * **trim**: resumed (a fresh pass: trim only drops copies that are redundant).
    * **out**: resumed (it writes whatever is still in staging).
    * **disable** (swap-in): resumed (a fresh pass fills only pages still missing); the VMM
      asked for every page back, and it gets them.
    * **file cleanup** after a disable: resumed as it was asked (gradual or at once).
    * Pending, Active, Failed: served as they were.
    """
    state = record.state
    note: str | None
    if record.enable_phase is EnablePhase.STARTING:
        prior = record.prior_state
        note = ("enable was interrupted by the monitor's death before any page moved; the "
                f"state is {prior} as before it; run enable again")
        return Decision(prior, prior.enabled, prior.enabled, note)
    if record.enable_phase is EnablePhase.MOVING:
        note = ("enable was interrupted by the monitor's death while moving guest memory; "
                "the pages moved are in staging and the rest is resident (state Pending); "
                "run enable again to move the rest")
        return Decision(SwapState.PENDING, True, True, note)
    if state is SwapState.READY:
        return Decision(state, False, False, None)
    note = None
    if state.in_progress:
        what = {SwapState.TRIM_IN_PROGRESS: "trim", SwapState.SWAP_OUT_IN_PROGRESS: "out",
                SwapState.SWAP_IN_IN_PROGRESS: "disable"}[state]
        note = f"{what} was interrupted by the monitor's death and resumed by its successor"
    return Decision(state, True, True, note)


def journal_for(area: RestartArea, restarts: Callable[[], int],
                last_resume: Callable[[], float]) -> Callable[[StateMachine], None]:
    """The state machine's journal: one area write per change."""

    def write(machine: StateMachine) -> None:
        area.write(AreaRecord(
            state=machine.state, enable_phase=EnablePhase(machine.enable_phase),
            prior_state=machine.prior_state,
            flags=FLAG_SLOW_CLEANUP if machine.slow_cleanup_asked else 0,
            restarts=restarts(), transition_pages=machine.transition.pages,
            last_resume_seconds=last_resume(), error=machine.error))

    return write


def wake_all(uffds: Sequence[Any], regions: Sequence[RegionSpec]) -> int:
    """UFFDIO_WAKE over every region of every uffd; returns how many wakes succeeded.

    A wake without waiters does nothing; a device whose process is gone refuses it (its
    threads are gone too)."""
    done = 0
    for uffd in uffds:
        for spec in regions:
            with contextlib.suppress(OSError):
                uffd.wake(spec.host_addr, spec.size)
                done += 1
    return done


def describe(record: AreaRecord) -> str:
    phase = "" if record.enable_phase is EnablePhase.NONE else (
        f", enable {record.enable_phase.name.lower()} (from {record.prior_state})")
    return f"state {record.state}{phase}, {record.restarts} restart(s) before"


__all__ = ["Decision", "HandlerSetup", "NotResumableError", "decide", "describe",
           "journal_for", "wake_all"]
