"""Serving a snapshot's guest memory lazily, fault by fault, from its memory file.

After the handshake (:mod:`vmmswap.snapshot.handshake`) the handler owns the VMM's userfaultfd.
Every missing page the guest touches arrives as a fault; the handler reads the page -- and, with
the data plane's adaptive :class:`~vmmswap.dataplane.readahead.Readahead`, the neighbours the
guest is walking towards -- from the memory file and fills it with UFFDIO_COPY through
:func:`~vmmswap.dataplane.page_fill.copy_run`, which turns partial fills and already-present
pages into progress.

What each page of a region is, is one slot in two numpy bitmaps: ``filled`` (served, or found
present) and ``removed`` (a REMOVE event gave it back: a balloon inflation). A removed page is
served as zeros from then on and is never part of a readahead run or a prefetch batch: serving
file data there would hand the guest bytes it had discarded.

The kernel's answers, and what they mean here:

* EEXIST: the page is already there (a readahead of another fault filled it, or the VMM's own
  access did). The waiter is woken explicitly; COPY does not wake on EEXIST.
* EAGAIN (MappingChangingError): a non-cooperative event is unread. The fault stays queued,
  the events are read first, then it is retried.
* anything else (ESRCH: the VMM died; EFAULT, ENOMEM): the serve loop raises. The fault stays
  blocked; no page is ever served that is not the file's data or a removed page's zeros.

A working set (:mod:`vmmswap.snapshot.working_set`) can be given: its pages are prefetched in
large sequential batches from the moment the handshake completes, between demand faults, which
always go first. The pages served on demand can be recorded into a new working-set file.

**Safety**: the handler never touches guest memory itself: it reads the file into its own
private bounce buffer (never registered with userfaultfd) and lets the kernel copy from there.
The file offset of a page comes only from the handshake's validated ``offset`` plus the page's
distance from the region base, within ``size``.
"""

from __future__ import annotations

import bisect
import logging
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.page_fill import Bounce, copy_run
from vmmswap.dataplane.readahead import DOWN, Readahead
from vmmswap.snapshot.handshake import RegionMapping
from vmmswap.snapshot.source import MemorySource
from vmmswap.uffd.errors import MappingChangingError, PageExistsError, PartialFillError
from vmmswap.uffd.events import PageFault, Remove, Unmap
from vmmswap.uffd.userfaultfd import Userfaultfd

_log = logging.getLogger(__name__)

#: Readahead cap: 2 MiB of 4 KiB pages, or two huge pages.
READAHEAD_BYTES: Final = 2 * 1024 * 1024
#: One prefetch batch: large sequential reads and COPYs, short enough to answer a fault soon.
PREFETCH_BATCH_BYTES: Final = 4 * 1024 * 1024
#: How often (ms) the loop looks again for a prefetch batch the source has ready.
_PREFETCH_POLL_MS: Final = 2
_BOUNCE_BYTES: Final = max(PREFETCH_BATCH_BYTES, 2 * READAHEAD_BYTES)


class ServeError(RuntimeError):
    """The handler cannot go on serving; the faults it had not served stay blocked."""


@dataclass(slots=True)
class ServeStats:
    """Counters of one serve session (printed as JSON by ``vmmswap serve-snapshot``)."""

    faults: int = 0
    pages_on_demand: int = 0
    pages_prefetched: int = 0
    zero_pages: int = 0
    existed: int = 0
    removes: int = 0
    retries: int = 0
    first_fault_s: float = 0.0
    seconds: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | int]:
        return {"faults": self.faults, "pages_on_demand": self.pages_on_demand,
                "pages_prefetched": self.pages_prefetched, "zero_pages": self.zero_pages,
                "existed": self.existed, "removes": self.removes, "retries": self.retries,
                "first_fault_s": round(self.first_fault_s, 6), "seconds": round(self.seconds, 6)}


class Region:
    """One handshake region with its per-page bitmaps and readahead state."""

    def __init__(self, mapping: RegionMapping) -> None:
        self.mapping = mapping
        self.base = mapping.base_host_virt_addr
        self.page_size = mapping.page_size
        self.pages = mapping.size // mapping.page_size
        self.filled: npt.NDArray[np.bool_] = np.zeros(self.pages, dtype=np.bool_)
        self.removed: npt.NDArray[np.bool_] = np.zeros(self.pages, dtype=np.bool_)
        self.readahead = Readahead(max(1, READAHEAD_BYTES // self.page_size))

    def page_of(self, address: int) -> int:
        return (address - self.base) // self.page_size

    def address_of(self, page: int) -> int:
        return self.base + page * self.page_size

    def file_offset(self, page: int) -> int:
        return self.mapping.offset + page * self.page_size

    def mark_removed(self, start: int, end: int) -> None:
        """``[start, end)`` (addresses, clipped to this region) now reads as zeros."""
        lo = max(start, self.base)
        hi = min(end, self.mapping.end)
        if lo >= hi:
            return
        first = (lo - self.base) // self.page_size
        last = -(-(hi - self.base) // self.page_size)
        self.removed[first:last] = True
        self.filled[first:last] = False


def _sorted_unique(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """``np.unique`` of an array that usually is sorted and unique already (a working-set file
    is saved so): checking costs 0.2 ms for 65,536 pages, np.unique 11-27 ms here -- time the
    restore's first fault waited for, as this runs between the handshake and the first
    fault served."""
    if len(values) < 2 or bool(np.all(values[1:] > values[:-1])):
        return values
    return np.unique(values)


class SnapshotServer:
    """Serves one VMM's faults from ``source`` (see the module docstring).

    ``prefetch`` is an array of 4 KiB page numbers of the memory file (a working set) to fill
    ahead of demand; ``record`` keeps a bitmap of the file's pages served on demand, for
    :meth:`recorded_pages`, until ``record_seconds`` after the first fault (None: until the end).
    """

    def __init__(self, uffd: Userfaultfd, mappings: list[RegionMapping], source: MemorySource, *,
                 prefetch: npt.NDArray[np.uint64] | None = None, record: bool = False,
                 record_seconds: float | None = None) -> None:
        self.uffd = uffd
        self.source = source
        self.regions = sorted((Region(m) for m in mappings), key=lambda r: r.base)
        self._bases = [r.base for r in self.regions]
        self.stats = ServeStats()
        self._bounce = Bounce(_BOUNCE_BYTES)
        self._zeros = Bounce(max(r.page_size for r in self.regions))
        self._pending: list[PageFault] = []
        self._prefetch = self._prefetch_runs(prefetch) if prefetch is not None else []
        file_pages = max(r.mapping.offset + r.mapping.size for r in self.regions) // 4096
        self._record: npt.NDArray[np.bool_] | None = (
            np.zeros(file_pages, dtype=np.bool_) if record else None)
        self._record_seconds = record_seconds
        self._start = time.monotonic()
        self._first_fault: float | None = None

    def close(self) -> None:
        self._bounce.close()
        self._zeros.close()

    # --- lookups ----------------------------------------------------------------------------
    def region_of(self, address: int) -> Region:
        i = bisect.bisect_right(self._bases, address) - 1
        if i >= 0 and address < self.regions[i].mapping.end:
            return self.regions[i]
        raise ServeError(f"fault at {address:#x} outside every handshake region")

    def _prefetch_runs(self, pages4k: npt.NDArray[np.uint64]) -> list[tuple[Region, int, int]]:
        """Working-set pages as ``(region, first_page, count)`` runs, file order, batch-sized."""
        runs: list[tuple[Region, int, int]] = []
        offsets = _sorted_unique(pages4k.astype(np.uint64)) * np.uint64(4096)
        for region in self.regions:
            m = region.mapping
            inside = offsets[(offsets >= m.offset) & (offsets < m.offset + m.size)]
            if not len(inside):
                continue
            pages = _sorted_unique((inside - np.uint64(m.offset)) // np.uint64(region.page_size))
            batch = max(1, PREFETCH_BATCH_BYTES // region.page_size)
            breaks = np.flatnonzero(np.diff(pages) != 1) + 1
            for run in np.split(pages, breaks):
                first, count = int(run[0]), len(run)
                for at in range(0, count, batch):
                    runs.append((region, first + at, min(batch, count - at)))
        return runs

    # --- the loop ---------------------------------------------------------------------------
    def serve(self, conn: socket.socket) -> ServeStats:
        """Serve until the VMM closes ``conn`` (Firecracker keeps it open while it runs)."""
        poller = select.poll()
        poller.register(self.uffd.fileno(), select.POLLIN)
        poller.register(conn.fileno(), select.POLLIN)
        conn.setblocking(False)
        try:
            waiting = False   # prefetch left, none of it ready in the source yet
            while True:
                timeout: float | None = None
                if self._pending or (self._prefetch and not waiting):
                    timeout = 0
                elif self._prefetch:
                    timeout = _PREFETCH_POLL_MS   # a fault still wakes us at once
                for fd, _mask in poller.poll(timeout):
                    if fd == conn.fileno() and self._vmm_gone(conn):
                        return self._finish()
                self._read_events()
                self._serve_pending()
                if self._prefetch and not self._pending:
                    waiting = not self._prefetch_one()
        finally:
            self.stats.seconds = time.monotonic() - self._start

    def _finish(self) -> ServeStats:
        self.stats.seconds = time.monotonic() - self._start
        return self.stats

    @staticmethod
    def _vmm_gone(conn: socket.socket) -> bool:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not data  # anything the VMM sends after the handshake is ignored

    def _read_events(self) -> None:
        while True:
            events = self.uffd.read_events()
            if not events:
                return
            for event in events:
                if isinstance(event, PageFault):
                    self._pending.append(event)
                elif isinstance(event, (Remove, Unmap)):
                    self.stats.removes += 1
                    for region in self.regions:
                        region.mark_removed(event.start, event.end)
                else:
                    raise ServeError(f"unexpected userfaultfd event {event!r} (the handler "
                                     "enables only page faults and REMOVE)")

    def _serve_pending(self) -> None:
        while self._pending:
            fault = self._pending[0]
            try:
                self.serve_fault(fault)
            except MappingChangingError:
                self.stats.retries += 1
                return  # events first; the fault stays queued and is retried
            self._pending.pop(0)

    # --- one fault --------------------------------------------------------------------------
    def serve_fault(self, fault: PageFault) -> None:
        """Fill the faulting page (and its readahead run) or its zeros; wake the waiter."""
        now = time.monotonic()
        if self._first_fault is None:
            self._first_fault = now
            self.stats.first_fault_s = now - self._start
        self.stats.faults += 1
        region = self.region_of(fault.address)
        page = region.page_of(fault.address)
        if region.removed[page]:
            self._fill_zero(region, page)
            return
        window, direction = region.readahead.window(page)
        first, end = self._clip_to_source(region, page, *self._run(region, page, window,
                                                                   direction))
        done = self._fill_file(region, first, end - first, focus=page - first)
        region.readahead.record(first, first + max(done, page - first + 1), window)
        self.stats.pages_on_demand += done
        if self._record is not None and (
                self._record_seconds is None or now - self._first_fault <= self._record_seconds):
            lo = region.file_offset(first) // 4096
            self._record[lo:lo + done * (region.page_size // 4096)] = True

    @staticmethod
    def _run(region: Region, page: int, window: int, direction: int) -> tuple[int, int]:
        """The readahead run around ``page``: up to ``window`` pages in ``direction``, stopping
        before a page that is removed or already filled."""
        if direction == DOWN:
            lo = max(0, page - window + 1)
            blocked = np.flatnonzero(region.removed[lo:page] | region.filled[lo:page])
            return (lo + int(blocked[-1]) + 1 if len(blocked) else lo), page + 1
        hi = min(region.pages, page + window)
        blocked = np.flatnonzero(region.removed[page + 1:hi] | region.filled[page + 1:hi])
        return page, (page + 1 + int(blocked[0]) if len(blocked) else hi)

    def _clip_to_source(self, region: Region, page: int, first: int, end: int,
                        ) -> tuple[int, int]:
        """The run cut to what a chunked source holds without another fetch (its
        ``readahead_span``; see ChunkSource.readahead_span for why); other sources read any
        run at one cost, so it stays whole. Whole pages: a huge page overlapping the span
        stays in it, and the faulting page always does."""
        span = getattr(self.source, "readahead_span", None)
        if not callable(span) or end - first <= 1:
            return first, end
        lo, hi = span(region.file_offset(first), (end - first) * region.page_size,
                      region.file_offset(page))
        origin = region.file_offset(0)
        return (min(page, max(first, (int(lo) - origin) // region.page_size)),
                max(page + 1, min(end, -(-(int(hi) - origin) // region.page_size))))

    def _read(self, region: Region, first: int, count: int) -> None:
        length = count * region.page_size
        try:
            self.source.read_into(region.file_offset(first), self._bounce.view[:length])
        except OSError as err:
            raise ServeError(f"memory source failed at {region.file_offset(first):#x} "
                             f"({length} bytes): {err}") from err

    def _fill_file(self, region: Region, first: int, count: int, *, focus: int) -> int:
        """COPY file pages ``[first, first + count)``; returns the pages settled from ``first``.

        Raises MappingChangingError (retry after events) and any other fill error when the
        focus page (``focus`` >= 0) was not settled.
        """
        self._read(region, first, count)
        dst = region.address_of(first)
        if region.page_size == 4096:
            out = copy_run(self.uffd, dst, self._bounce.address, count, wake=True,
                           focus=max(focus, 0))
            done, existed, error = out.done, out.existed, out.error
            if out.focus_existed and focus >= 0:
                self.uffd.wake(dst + focus * 4096, 4096)
        else:
            done, existed, error = self._copy_huge(dst, self._bounce.address, count,
                                                   region.page_size, focus)
        region.filled[first:first + done] = True
        self.stats.existed += existed
        if error is not None and (focus < 0 or done <= focus):
            raise error
        return done

    def _copy_huge(self, dst: int, src: int, count: int, size: int, focus: int,
                   ) -> tuple[int, int, OSError | None]:
        """The hugetlbfs fill: whole huge pages, EEXIST skipped (and woken at the focus)."""
        done = existed = 0
        while done < count:
            try:
                self.uffd.copy(dst + done * size, (count - done) * size, src + done * size)
            except PartialFillError as err:
                done += err.bytes_done // size
                continue
            except PageExistsError:
                if done == focus:
                    self.uffd.wake(dst + done * size, size)
                done += 1
                existed += 1
                continue
            except OSError as err:
                return done, existed, err
            done = count
        return done, existed, None

    def _fill_zero(self, region: Region, page: int) -> None:
        """A removed page: zeros (COPY from a zero buffer serves read and write faults)."""
        dst = region.address_of(page)
        try:
            self.uffd.copy(dst, region.page_size, self._zeros.address)
        except PageExistsError:
            self.uffd.wake(dst, region.page_size)
            self.stats.existed += 1
        else:
            self.stats.zero_pages += 1
        region.filled[page] = True
        region.removed[page] = False  # zeros are now its content; file data never again

    # --- prefetch ---------------------------------------------------------------------------
    def _next_prefetch(self) -> int:
        """Index of the first batch the source can give without waiting (a store's chunks in
        its cache), or -1. A source that cannot tell is always ready."""
        ready = getattr(self.source, "ready", None)
        if not callable(ready):
            return 0
        for i, (region, first, count) in enumerate(self._prefetch):
            if ready(region.file_offset(first), count * region.page_size):
                return i
        return -1

    def _prefetch_one(self) -> bool:
        """Fill a working-set batch, minus pages filled or removed meanwhile; False if no batch
        was ready. A batch whose bytes a store is still fetching waits: the loop must never
        block in the source while demand faults queue behind it."""
        i = self._next_prefetch()
        if i < 0:
            return False
        region, first, count = self._prefetch.pop(i)
        skip = region.filled[first:first + count] | region.removed[first:first + count]
        if skip.all():
            return True
        wanted = np.flatnonzero(~skip)
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        for run in np.split(wanted, breaks):
            lo, n = first + int(run[0]), len(run)
            try:
                done = self._fill_file(region, lo, n, focus=-1)
            except MappingChangingError:
                self.stats.retries += 1
                self._prefetch.insert(0, (region, lo, n))
                return True
            self.stats.pages_prefetched += done
        return True

    # --- the working set --------------------------------------------------------------------
    def recorded_pages(self) -> npt.NDArray[np.uint64]:
        """4 KiB page numbers of the memory file served on demand while recording."""
        if self._record is None:
            return np.zeros(0, dtype=np.uint64)
        return np.flatnonzero(self._record).astype(np.uint64)
