"""The discard log: discards the VMM announces before it makes them, for a successor monitor.

Why it exists: a discard (``GuestMemory.discard``, MADV_REMOVE) reaches the monitor as a
UFFD_EVENT_REMOVE, and the kernel lets the discarding thread go on as soon as the monitor has
*read* the event. A monitor killed between reading it and dropping its staged or swapped copy
takes the event with it, and no ordering inside the monitor can close that window (the read
is the only copy). A successor would still hold the page's old copy and serve it where the
guest expects zeros: silent corruption. So the VMM side writes the discard down first, in the
page state the successor maps: one byte per guest page (``PageState.discard_pending``; byte
stores, so concurrent discarders never lose each other's marks), set *before* the madvise. The
monitor clears the bytes after it has applied the REMOVE; a successor applies every byte still
set (:func:`pending_runs`), which is harmless for a discard not yet made: the guest has given
the page up, and its REMOVE will come again. A second byte per page
(``PageState.discard_made``) says the madvise has returned, so that a fresh registration can
tell a discard still in flight from one already made (:func:`forget_settled`); a thread
stalled between its madvise's return and that store looks in flight, so a fresh registration
also drops the marks of pages that read as zeros (a discard leaves nothing else).

The bytes stay a hole of the memfd until a discard first touches them, so a successor finds
the set ones with SEEK_DATA: the scan costs what was ever discarded, not the guest's size.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.guest_memory import data_ranges
from vmmswap.dataplane.page_state import PageState
from vmmswap.dataplane.present_list import runs_of

__all__ = ["DiscardLog", "clear", "forget_settled", "pending_runs"]

_MAX_SCAN: Final = 1 << 20


class DiscardLog:
    """The VMM's side: mark a host-address range as being discarded.

    Give :meth:`announce` to ``GuestMemory.set_discard_hook`` (the VMM maps the page state;
    device processes inherit the mapping across fork).
    """

    def __init__(self, state: PageState) -> None:
        self._state = state
        specs = state.regions()
        self._starts = [s.host_addr for s in specs]
        self._specs = specs
        bases = [0]
        for spec in specs:
            bases.append(bases[-1] + spec.size // state.page_size)
        self._bases = bases

    def pages_of(self, host_addr: int, length: int) -> tuple[int, int]:
        """Page indexes ``[first, end)`` of a host range inside one region (ValueError else)."""
        i = bisect.bisect_right(self._starts, host_addr) - 1
        ps = self._state.page_size
        if i < 0 or host_addr + length > self._specs[i].host_end or length < 0:
            raise ValueError(f"[{host_addr:#x}, +{length:#x}) is not inside one guest region "
                             "of the page state")
        first = self._bases[i] + (host_addr - self._specs[i].host_addr) // ps
        return first, first + (length + ps - 1) // ps

    def forget(self, start: int, end: int) -> None:
        """Clear the marks of host range ``[start, end)``, which may span regions (the parts
        outside every region are ignored): a REMOVE the monitor could not apply."""
        for spec in self._specs:
            lo, hi = max(start, spec.host_addr), min(end, spec.host_end)
            if lo < hi:
                clear(self._state, *self.pages_of(lo, hi - lo))

    def announce(self, host_addr: int, length: int) -> Callable[[bool], None]:
        """The range is about to be discarded (call before the madvise); returns what to call
        after it, with whether the madvise succeeded. The VMM clears its own marks when no
        monitor will: a discard made while nothing was registered sent no REMOVE event, and
        one whose madvise failed may have kept its data (a resident page must not keep a
        mark: the next enable stages it, and a successor's recovery would drop it; a page
        whose REMOVE the monitor applied reads zeros either way). Left set, marks outlive
        their discard and a successor drops the copies of pages written since."""
        first, end = self.pages_of(host_addr, length)
        state = self._state
        state.discard_made[first:end] = 0
        state.discard_pending[first:end] = 1

        def done(made: bool) -> None:
            if made:
                # Before the flag is read: a fresh registration that freezes this thread
                # from here on sees the discard as made, not in flight (forget_settled).
                state.discard_made[first:end] = 1
            if not made or not state.registered:
                clear(state, first, end)

        return done


def _pending_extents(state: PageState, first: int, end: int) -> list[tuple[int, int]]:
    """Page ranges inside ``[first, end)`` whose log bytes are data in the memfd."""
    base = state.layout.discard
    out: list[tuple[int, int]] = []
    for start, stop in data_ranges(state.fileno(), base + end, base + first):
        out.append((max(first, start - base), min(end, stop - base)))
    return out


def clear(state: PageState, first: int, end: int) -> None:
    """The REMOVE of ``[first, end)`` is applied: forget its marks (touching only log pages
    that were ever written, so a large REMOVE allocates nothing here)."""
    for lo, hi in _pending_extents(state, first, end):
        view = state.discard_pending[lo:hi]
        if view.any():
            view[:] = 0


def forget_settled(state: PageState, holding: Callable[[int, int], npt.NDArray[np.bool_]],
                   ) -> int:
    """At a fresh registration (every process of the VMM frozen): clear the marks that can
    only be stale, keep those of discards still in flight; returns the marks kept.

    A mark on a page that is a hole in guest memory is settled: its discard is done (or
    the page held nothing), the move will not stage it, and a REMOVE still to come drops
    nothing -- so losing the mark loses nothing. So is a mark whose madvise has returned
    (``discard_made``): made while nothing was registered, it sent no REMOVE, and a page
    that holds data again was filled since -- written, or merely read: a read of a hole in
    shared memory allocates a zero page -- so a mark kept for it would make a later
    successor drop the staged copy of whatever the guest wrote there next (the torture
    harness's seed 36). A mark on a resident page whose madvise has not returned is a
    discard frozen between its announce and its madvise: the move stages the page, the
    REMOVE comes after the thaw, and if the monitor dies after reading it the mark is what
    makes the successor drop the staged copy (clearing it served the old page: seed 39).
    A mark on a page that reads as zeros is settled as well, whether its madvise is to come
    or not: the discard leaves zeros, so dropping the page's copy and serving it give the
    same bytes. That closes what the made byte leaves open: a discarder stalled between its
    madvise's return and its store of ``discard_made`` -- in Python the thread must take the
    GIL again there, milliseconds under load -- while another thread's read allocated a zero
    page in the hole looks in flight, and its mark, kept, outlived the discard (the torture's
    seed 10798374: the successor after the next kill dropped what the guest wrote there).
    Only a page written by someone else while its discarder was in that window still keeps a
    stale mark (a guest writing a page it is giving to the balloon). ``holding(first, end)``
    says which of the pages hold data other than zeros."""
    kept = 0
    for first, end in pending_runs(state):
        in_flight = holding(first, end) & (state.discard_made[first:end] == 0)
        view = state.discard_pending[first:end]
        view[~in_flight] = 0
        kept += int(np.count_nonzero(in_flight))
    return kept


def pending_runs(state: PageState) -> list[tuple[int, int]]:
    """``(first, end)`` page runs whose discard is announced and not known applied."""
    runs: list[tuple[int, int]] = []
    for lo, hi in _pending_extents(state, 0, state.num_pages):
        for at in range(lo, hi, _MAX_SCAN):
            part = state.discard_pending[at:min(hi, at + _MAX_SCAN)]
            hits = np.flatnonzero(part).astype(np.int64) + at
            runs.extend(runs_of(hits))
    return runs
