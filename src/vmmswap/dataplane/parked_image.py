"""Guest memory read as a Firecracker memory file from a data plane that nobody is serving.

Parking a swapped-out VM must not bring its memory back into RAM to read it: pages sit in
staging and in the swap file, and they go to the store from there. The VMM keeps every
descriptor that says where a page is (the page state, staging, the swap file: see
:mod:`.page_state`), so once the monitor has exited (``Command.DETACH``) and the vCPUs are
parked, those descriptors *are* the guest's memory, frozen: nothing else writes them.

Each page is read from the one place the fault handler would serve it from, in the handler's
order (``PageHandler.handle_page_fault``): staging when its bit is set, else the swap file when
the page's slot is current, else the guest memfd (a resident page, or a hole: zeros -- a page
never written, or one discarded). A page the VMM marked as being discarded
(:mod:`.discard_log`) is the memfd's, as a successor monitor would leave it (it drops the
staging and file copies of such a page).

**Safety**: a wrong source means a wrong page in the parked snapshot, which the restored guest
would run on. So the reader refuses a page state whose journal names a step in progress (a
monitor killed in the middle of a swap-out or a trim left arrays that disagree until a
successor finishes the step), reads every byte it returns in full (a short read of staging or
of the swap file is an error, never zeros), and reads only while the caller guarantees that no
monitor runs and no vCPU or device writes guest memory.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.dataplane.page_state import JournalOp, PageState
from vmmswap.dataplane.present_list import PresentList
from vmmswap.uffd.pagesize import PAGE_SIZE

__all__ = ["ParkedImage", "ParkedImageError", "ReadCounts"]

#: Where a page is read from (one byte per page of a read).
_MEMFD, _STAGING, _FILE = 0, 1, 2


class ParkedImageError(OSError):
    """The data plane cannot be read as the guest's memory; nothing was returned from it."""


@dataclass(slots=True)
class ReadCounts:
    """Bytes read from each place (a park reports where its memory came from). Uploads read
    on several threads: one lock."""

    memory: int = 0
    staging: int = 0
    swap_file: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, kind: int, nbytes: int) -> None:
        with self._lock:
            if kind == _STAGING:
                self.staging += nbytes
            elif kind == _FILE:
                self.swap_file += nbytes
            else:
                self.memory += nbytes


class ParkedImage:
    """A read-only memory file over ``regions`` (``(spec, memfd)`` in the memory file's order,
    regions back to back from offset 0) and the page state, staging memfd and swap file that
    describe them (the VMM's kept descriptors; borrowed, never closed here)."""

    def __init__(self, state: PageState, regions: Sequence[tuple[RegionSpec, int]],
                 staging_fd: int | None, swap_fd: int) -> None:
        if state.journal.op != JournalOp.NONE:
            raise ParkedImageError(
                f"the page state's journal names a step in progress (op {state.journal.op}): "
                "a monitor died in the middle of it and only a successor can finish it")
        self._state = state
        self._page = state.page_size
        self._staging_fd = staging_fd
        self._swap_fd = swap_fd
        self._staged = PresentList.over(state.staging_present, state.num_pages)
        self._current = PresentList.over(state.file_current, state.num_pages)
        # Global page numbers follow the page state's regions in host-address order.
        base, first_page = 0, {}
        for spec in state.regions():
            first_page[spec.host_addr] = base
            base += spec.size // self._page
        self._regions: list[tuple[int, int, int, int]] = []   # file start, size, memfd, page 0
        at = 0
        for spec, memfd in regions:
            if spec.host_addr not in first_page:
                raise ParkedImageError(f"region at {spec.host_addr:#x} is not in the page state")
            if spec.size % self._page:
                raise ParkedImageError(f"region of {spec.size:#x} bytes is not whole pages")
            self._regions.append((at, spec.size, memfd, first_page[spec.host_addr]))
            at += spec.size
        self._starts = [r[0] for r in self._regions]
        self._size = at
        self.counts = ReadCounts()

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        """Nothing to release: the descriptors are the VMM's."""

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the memory file's bytes at ``offset`` (4 KiB aligned)."""
        if offset % PAGE_SIZE or len(view) % PAGE_SIZE:
            raise ParkedImageError(f"reads are whole 4 KiB pages, got {offset:#x}+{len(view):#x}")
        if offset < 0 or offset + len(view) > self._size:
            raise ParkedImageError(f"read {offset:#x}+{len(view):#x} outside the "
                                   f"{self._size:#x} bytes of guest memory")
        done = 0
        while done < len(view):
            at = offset + done
            i = bisect.bisect_right(self._starts, at) - 1
            start, size, memfd, page0 = self._regions[i]
            n = min(len(view) - done, start + size - at)
            self._read_region(memfd, page0, at - start, view[done:done + n])
            done += n

    def _read_region(self, memfd: int, page0: int, rel: int, view: memoryview) -> None:
        ps = self._page
        first, last = rel // ps, -(-(rel + len(view)) // ps)
        g0, g1 = page0 + first, page0 + last
        kinds = np.where(self._staged.bools(g0, g1), _STAGING,
                         np.where(self._current.bools(g0, g1), _FILE, _MEMFD)).astype(np.int8)
        kinds[self._state.discard_pending[g0:g1] != 0] = _MEMFD
        slots = self._state.slots[g0:g1].astype(np.int64) - 1
        if bool(((kinds == _FILE) & (slots < 0)).any()):
            raise ParkedImageError("a page marked current in the swap file has no slot")
        # Runs of one source (and, in the file, of consecutive slots).
        step = np.flatnonzero((np.diff(kinds) != 0)
                              | ((kinds[1:] == _FILE) & (np.diff(slots) != 1))) + 1
        for a, b in zip([0, *step.tolist()], [*step.tolist(), len(kinds)], strict=True):
            lo = max(rel, (first + a) * ps)       # bytes of the region this run covers
            hi = min(rel + len(view), (first + b) * ps)
            kind = int(kinds[a])
            if kind == _STAGING:
                fd, pos = self._staging_fd, (g0 + a) * ps + lo - (first + a) * ps
            elif kind == _FILE:
                fd, pos = self._swap_fd, int(slots[a]) * ps + lo - (first + a) * ps
            else:
                fd, pos = memfd, lo
            if fd is None:
                raise ParkedImageError("a page is in staging but there is no staging memfd")
            _read_full(fd, view[lo - rel:hi - rel], pos, kind)
            self.counts.add(kind, hi - lo)


def _read_full(fd: int, view: memoryview, pos: int, kind: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], pos + done)
        if got <= 0:
            where = {_STAGING: "staging", _FILE: "the swap file"}.get(kind, "guest memory")
            raise ParkedImageError(f"{where} ended at {pos + done:#x}: a page's bytes are "
                                   "missing (never read as zeros)")
        done += got
