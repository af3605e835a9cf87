"""The monitor's registrations and their discard log: a fresh enable's, and a successor's.

Who says whether guest memory is registered matters beyond the uffds: the VMM reads the page
state's "registered" flag after every discard (:mod:`vmmswap.dataplane.discard_log`) to decide
who clears the discard's mark, and a mark that outlives its discard makes a later successor
drop the staged copy of a page written since -- a zero page where guest data was. So every
path that registers or unregisters (an enable, a disable, a successor taking over, in any
state) sets the flag with it, and a REMOVE no handler applies still clears its marks. A mixin
of :class:`vmmswap.control.monitor.Monitor`.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from vmmswap.control.monitor_faults import UffdSet
from vmmswap.control.monitor_resume import (
    HandlerSetup,
    NotResumableError,
    decide,
    describe,
    wake_all,
)
from vmmswap.control.monitor_state import PageHandlerLike, StateMachine
from vmmswap.control.protocol import InitRequest
from vmmswap.control.restart_area import RestartArea
from vmmswap.control.status import SwapState
from vmmswap.control.swap_cleanup import FileTruncator
from vmmswap.dataplane import discard_log
from vmmswap.dataplane.guest_memory import RegionSpec, data_ranges
from vmmswap.dataplane.trim import zero_page_mask

__all__ = ["Registration"]

_log = logging.getLogger("vmmswap.control.monitor")

#: Bytes of guest memory read at a time when a fresh registration looks at marked pages.
_READ_CHUNK: Final = 1 << 20


def _attach_state(fd: int) -> Any:
    """The data plane's page state over the VMM's memfd (imported only when there is one)."""
    return importlib.import_module("vmmswap.dataplane.page_state").PageState.attach(fd)


class Registration:
    """Mixin: map the page state, take over from a dead monitor, register and unregister."""

    page_state: Any
    state_fd: int | None
    init: InitRequest
    area: RestartArea | None
    uffds: UffdSet
    machine: StateMachine
    truncator: FileTruncator
    last_resume_seconds: float
    regions: Sequence[RegionSpec]
    memfds: Sequence[int]
    page_sizes: Sequence[int]
    factory: Callable[[HandlerSetup], PageHandlerLike]

    # Supplied by the monitor.
    def _setup(self, resume: bool) -> HandlerSetup:
        raise NotImplementedError

    def _map_page_state(self) -> None:
        """Map the VMM's page state (once): the handler's arrays, and the flag and marks of
        the discard log, which matter even while no handler exists."""
        if self.page_state is None and self.state_fd is not None:
            self.page_state = _attach_state(self.state_fd)

    # --- taking over from a dead monitor --------------------------------------------------------
    def resume(self) -> str:
        """Take over the dead predecessor's state (see :mod:`.monitor_resume`); a line for
        the log. NotResumableError / RestartAreaError / OSError if it cannot be done."""
        assert self.init.resume is not None
        record = self.area.read() if self.area is not None else None
        if record is None:
            raise NotResumableError("no control area: the dead monitor's state is unknown")
        plan = decide(record)
        # Attached even when no handler resumes: the dead monitor may have left the page
        # state saying "registered" (Ready with a kept file), and left so, every discard of
        # the VMM would keep its mark for a REMOVE no monitor applies (seeds 15 and 76).
        self._map_page_state()
        handler = self.factory(self._setup(resume=True)) if plan.needs_handler else None
        if plan.register:
            if self.page_state is not None:
                self.page_state.registered = True
            self.uffds.register_all()  # the same uffds: a no-op where already registered
        else:
            self.uffds.unregister_all(force=True)  # undo a registration the death cut short
            if self.page_state is not None:
                self.page_state.registered = False
                # No handler resumes (Ready): every copy the dead monitor held is dropped, so
                # every discard mark is settled -- and one it had read the REMOVE of but not
                # cleared would outlive its discard: the page written again, staged by the
                # next enable, and a later successor's recovery would drop it (a zero page
                # served; the torture harness's seeds 15 and 76). Cleared after the flag: a
                # discard still in flight now clears its own mark (DiscardLog.announce).
                discard_log.clear(self.page_state, 0, self.page_state.num_pages)
        error = plan.note or record.error
        self.machine.adopt(handler, plan.state, pages=record.transition_pages, error=error,
                           slow_cleanup=record.slow_cleanup)
        if plan.state is SwapState.READY:
            if record.slow_cleanup:
                self.truncator.start()
            else:
                self.truncator.finish()
        woken = wake_all([e.uffd for e in self.uffds.entries], self.regions)
        self.last_resume_seconds = max(0.0, time.monotonic() - self.init.resume.died_at)
        self.machine._persist()
        return (f"resumed from {describe(record)}: now {plan.state}; {woken} range(s) woken; "
                f"{self.last_resume_seconds * 1000:.1f} ms after the death")

    def register_all(self) -> None:
        """A fresh enable's registration (VMM tree frozen). The page state says "registered"
        first: from now on the VMM leaves its discard marks to the monitors (it clears them
        itself only for a discard made while nothing was registered, which sends no REMOVE).
        Marks found now are settled (a page holding no data but zeros, or whose madvise has
        returned: cleared) or a discard frozen between its announce and its madvise (a page
        holding data, about to be staged: kept until its REMOVE is applied; see
        discard_log.forget_settled)."""
        state = self.page_state
        if state is not None:
            state.registered = True
        self.uffds.register_all()
        if state is not None:
            kept = discard_log.forget_settled(state, self._holding_data)
            if kept:
                _log.info("%d discard marks of pages holding data kept: discards in flight", kept)

    def unregister_all(self) -> None:
        self.uffds.unregister_all()
        if self.page_state is not None:
            self.page_state.registered = False

    def _forget_marks(self, start: int, end: int) -> None:
        """Clear the discard marks of host range ``[start, end)``, whose REMOVE no handler
        applied (none held a copy, or applying it failed)."""
        if self.page_state is not None:
            discard_log.DiscardLog(self.page_state).forget(start, end)

    def _holding_data(self, first: int, end: int) -> npt.NDArray[np.bool_]:
        """Which of the page state's pages ``[first, end)`` (global, host-address order) hold
        data other than zeros in their memfd. Holes hold none, and neither does a page that
        reads as zeros (a read of a hole in shared memory allocates one; a hole of hugetlbfs,
        whose SEEK_DATA cannot tell holes, reads as zeros without allocating): read only
        inside the data extents, so the cost is the marked pages that hold data."""
        out = np.zeros(end - first, dtype=np.bool_)
        base = 0
        for spec, fd, ps in sorted(zip(self.regions, self.memfds, self.page_sizes, strict=True),
                                   key=lambda r: r[0].host_addr):
            n = spec.size // ps
            lo, hi = max(first, base), min(end, base + n)
            if lo < hi:
                step = max(1, _READ_CHUNK // ps)
                for a, b in data_ranges(fd, (hi - base) * ps, (lo - base) * ps):
                    pa, pb = max(a // ps + base, lo), min(-(-b // ps) + base, hi)
                    for at in range(pa, pb, step):
                        stop = min(pb, at + step)
                        out[at - first:stop - first] = _nonzero_pages(fd, (at - base) * ps,
                                                                      stop - at, ps)
            base += n
        return out


def _nonzero_pages(fd: int, offset: int, count: int, page_size: int) -> npt.NDArray[np.bool_]:
    """Which of ``count`` pages of ``fd`` from ``offset`` hold a nonzero byte (past the end
    of the file: none)."""
    buf = bytearray(count * page_size)
    view = memoryview(buf)
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return ~zero_page_mask(np.frombuffer(buf, dtype=np.uint64).reshape(count, page_size // 8))
