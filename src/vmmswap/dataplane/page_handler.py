"""The page handler: where every guest page lives, and moving pages between those places.

A guest page is in exactly one of four places: guest memory (the VMM's memfd), staging memory,
the swap file (its slot is *current*), or nowhere (it reads as zeros). The handler moves pages
between them on the monitor's command (:meth:`PageHandler.move_to_staging`, ``swap_out``,
``start_trim``, ``start_swap_in``) and on the guest's demand (:meth:`PageHandler.handle_page_fault`,
:meth:`PageHandler.handle_remove`). It is crosvm's ``PageHandler`` with three changes:

* **Readahead.** crosvm fills one 4 KiB page per fault. Here a fault fills the run of
  neighbouring pages (above or below, following the access pattern) that sit in the same source,
  up to an adaptive window (:mod:`vmmswap.dataplane.readahead`): sequential page-in costs one round
  trip
  per 2 MiB instead of per page. A long run is filled by two threads, one half each
  (:class:`~vmmswap.dataplane.page_fill.RunFiller`), since the faulting guest leaves the second CPU
  idle.
* **No mapping per page.** Staging and the swap file are read with ``preadv`` into one bounce
  buffer this process populated once, and COPY reads from there. Serving a fault maps nothing,
  so no page table of the monitor changes per page (on this project's nested-virtualisation CI
  host a page-table update costs more than copying the page); the one mapping of staging is
  populated by an enable before the freeze (:meth:`PageHandler.prepare_move`); while it is
  there, staging pages are COPYed from it directly (``StagingMemory.map_pages``). Staging
  memory that pages leave is freed in batches by a helper thread (:mod:`vmmswap.dataplane.staging`).
* **Page state in bits.** 4.25 bytes per guest page in total (crosvm: about 9).

**Pages are the guest's.** Every index, bitmap bit, staging page and swap-file slot is one page
of the guest's memory: 4 KiB, or 2 MiB for hugetlbfs memory (``MFD_HUGETLB | MFD_HUGE_2MB``).
The kernel resolves a hugetlb fault only with a COPY of the whole, aligned huge page, refuses
ZEROPAGE there (zeros are COPYed from a zero buffer), and frees a hugetlbfs page only whole, so
working in that unit throughout is what keeps every operation legal. The unit is asked of the
kernel once, per region, at construction; all regions of one handler share it.

**Safety rule** (the guest-memory one, see :mod:`vmmswap.dataplane.guest_memory`): the monitor's
own access
to guest memory is not registered with userfaultfd. Reading a hole through a mapping of the memfd
makes the kernel allocate a zero page in the shared file, after which the VMM's access no longer
faults and the guest silently sees zeros. The handler therefore never maps guest memory: it reads
it only with ``copy_file_range`` at the ranges SEEK_DATA/SEEK_HOLE report as data (a file read of
a hole does not allocate, but a racing writer could still lose data), and only in
:meth:`PageHandler.move_to_staging`, whose precondition is that every process mapping guest
memory is frozen.

The monitor is single-threaded and calls one method at a time; the handler holds no lock.
"""

from __future__ import annotations

import bisect
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane import move, move_prepare
from vmmswap.dataplane.crash_points import crash_point
from vmmswap.dataplane.guest_memory import (
    RegionSpec,
    check_aligned,
    memfd_page_size,
    resident_bytes,
    validate_regions,
)
from vmmswap.dataplane.kept_file import KeptFile
from vmmswap.dataplane.metrics import SwapMetrics
from vmmswap.dataplane.page_fill import (
    Bounce,
    MapFn,
    RunFiller,
    huge_page_exists,
    settled_block,
)
from vmmswap.dataplane.page_handler_remove import RemoveHandling
from vmmswap.dataplane.page_handler_tracking import DirtyTrackingHandling
from vmmswap.dataplane.page_state import Journal, PageState
from vmmswap.dataplane.page_store import InvalidAddressError, Region
from vmmswap.dataplane.present_list import PresentList
from vmmswap.dataplane.readahead import UP, Readahead
from vmmswap.dataplane.staging import StagingMemory, create_staging_memfd
from vmmswap.dataplane.swap_file import MAX_PAGES, SwapFile
from vmmswap.dataplane.swap_in import SwapInContext
from vmmswap.dataplane.swap_out import SwapOutWriter
from vmmswap.dataplane.trim import TrimContext
from vmmswap.uffd.errors import (
    MappingChangingError,
    PageExistsError,
    ProcessGoneError,
)
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, is_page_aligned
from vmmswap.uffd.userfaultfd import Userfaultfd

__all__ = [
    "DEFAULT_MAX_READAHEAD_BYTES",
    "MAX_SWAP_CHUNK_BYTES",
    "InvalidAddressError",
    "MappingChangingError",
    "PageHandler",
    "PageHandlerMetrics",
    "ProcessGoneError",
    "Region",
]

_log = logging.getLogger(__name__)

#: crosvm's MAX_SWAP_CHUNK_SIZE, and the readahead cap.
MAX_SWAP_CHUNK_BYTES: Final = 2 * 1024 * 1024
DEFAULT_MAX_READAHEAD_BYTES: Final = 2 * 1024 * 1024
#: The readahead cap in huge pages (hugetlbfs): 2 MiB would be one page, no readahead at all,
#: and a run of several lets the second CPU read and copy half of it (see RunFiller).
DEFAULT_MAX_READAHEAD_HUGE_PAGES: Final = 4


#: The handler's counters (see :mod:`vmmswap.dataplane.metrics`).
PageHandlerMetrics = SwapMetrics


class PageHandler(RemoveHandling, DirtyTrackingHandling):
    """Moves guest pages between guest memory, staging, the swap file and nowhere.

    REMOVE events and recovery are :class:`~.page_handler_remove.RemoveHandling`, dirty tracking
    :class:`~.page_handler_tracking.DirtyTrackingHandling` (mixins, one concept per file).

    Build it with :meth:`create`. It owns the staging memfd, the swap file (created or given)
    and its buffers, and closes them in :meth:`close`; it never closes the region memfds.
    """

    def __init__(self, regions: Sequence[Region], staging: StagingMemory, swap_file: SwapFile,
                 *, readahead: bool = True,
                 max_readahead_bytes: int | None = None,
                 workers: int | None = None, fill_threads: bool = True,
                 state: PageState | None = None, owns_state: bool = False,
                 tracking: bool = False) -> None:
        self.regions = tuple(sorted(regions, key=lambda r: r.host_addr))
        sizes = {r.page_size for r in self.regions} | {staging.page_size, swap_file.page_size}
        if len(sizes) != 1:
            raise ValueError(f"regions, staging and swap file disagree on the page size: "
                             f"{sorted(sizes)}")
        #: The guest's page in bytes (2 MiB on hugetlbfs): the unit of every page count here.
        self.page_size = self.regions[0].page_size
        ps = self.page_size
        self._starts = [r.host_addr for r in self.regions]
        self.num_pages = sum(r.num_pages for r in self.regions)
        self.staging = staging
        self.swap_file = swap_file
        self.readahead_enabled = readahead
        if max_readahead_bytes is None:
            max_readahead_bytes = (DEFAULT_MAX_READAHEAD_BYTES if ps == PAGE_SIZE
                                   else DEFAULT_MAX_READAHEAD_HUGE_PAGES * ps)
        self._readahead = Readahead(max(1, max_readahead_bytes // ps))
        self.bounce = Bounce(max(max_readahead_bytes, MAX_SWAP_CHUNK_BYTES, ps), ps)
        self.filler = RunFiller(self.bounce.address, self.bounce.view, threads=fill_threads,
                                page_size=ps,
                                exists=self._huge_page_exists if ps > PAGE_SIZE else None)
        self._zero = Mapping.anonymous(ps, populate=True)
        #: Huge pages are COPYed from the swap file's page cache in place, not read first
        #: (see SwapFile.map_pages); small pages keep the bounce buffer.
        self.file_mapper: MapFn | None = swap_file.map_pages if ps != PAGE_SIZE else None
        self._workers = workers
        #: Incremented by every move to staging: resumable contexts restart their scans.
        self.epoch = 0
        #: Staging pages were populated for the next move (prepare_move): the move frees
        #: the ones it did not fill.
        self._prepared = False
        #: Where the page state lives (None: private arrays, no successor can resume).
        self.state = state
        self._owns_state = owns_state
        self._journal = state.journal if state is not None else None
        self._writer = SwapOutWriter(staging, swap_file, journal=self._journal)
        #: Dirty tracking (None: off): pages back from their file slot and not written since.
        #: Fills through a uffd registered MISSING | WP are write-protected (the monitor sets
        #: ``write_protect_fills`` on it), and only those make pages clean.
        self.clean: KeptFile | None = KeptFile(self.regions, swap_file) if tracking else None
        #: Pages release_clean made file pages again, for the next move to punch uncopied.
        self._released: npt.NDArray[np.bool_] | None = None
        self._reset_counters()
        self._closed = False

    @classmethod
    def create(cls, regions: Sequence[tuple[RegionSpec, int]],
               swap_dir: str | os.PathLike[str] | None = None, *,
               swap_file: SwapFile | None = None, readahead: bool = True,
               max_readahead_bytes: int | None = None,
               workers: int | None = None, fill_threads: bool = True,
               state: PageState | None = None, staging_fd: int | None = None,
               tracking: bool = False) -> PageHandler:
        """A handler for ``regions`` (each a spec and the memfd the VMM maps there).

        Unless ``swap_file`` is given, creates a nameless swap file in ``swap_dir`` (default:
        the system temporary directory). A given ``swap_file`` becomes the handler's and is
        closed with it (its descriptor only if it owns it). ``state`` (a
        :class:`~vmmswap.dataplane.page_state.PageState` for these regions) and ``staging_fd``
        (:func:`~vmmswap.dataplane.staging.create_staging_memfd`) are where the page state and
        the staged pages live, so that a successor can :meth:`resume`; both are reset (a fresh
        enable: the swap file is truncated too) and stay the caller's. Without them the
        handler makes private ones. The memfds stay the caller's. ``tracking`` turns dirty
        tracking on (every region registered MISSING | WP on uffds with
        :data:`~vmmswap.dataplane.dirty.DIRTY_TRACKING_FEATURES`). Invalid regions (unaligned
        -- to the huge page, on hugetlbfs --, overlapping -- the error names both ranges --,
        larger than their memfd, or of mixed page sizes) raise ValueError and nothing is
        created; a ``state`` for other regions raises PageStateError.
        """
        return cls._build(regions, swap_dir, swap_file=swap_file, readahead=readahead,
                          max_readahead_bytes=max_readahead_bytes, workers=workers,
                          fill_threads=fill_threads, state=state, staging_fd=staging_fd,
                          fresh=True, tracking=tracking)

    @classmethod
    def resume(cls, regions: Sequence[tuple[RegionSpec, int]], *,
               swap_file: SwapFile | int, state: PageState, staging_fd: int,
               readahead: bool = True, max_readahead_bytes: int | None = None,
               workers: int | None = None, fill_threads: bool = True,
               tracking: bool = False) -> PageHandler:
        """The successor of a dead handler over the same regions, swap file, state and staging.

        Nothing is reset: the arrays are the mapping of ``state``. The step the journal names
        as half done is finished or undone, discards the VMM had announced
        (:mod:`vmmswap.dataplane.discard_log`) are applied, and staging pages the state does
        not hold are freed in the background. Then the handler is as usable as the dead one
        was: faults, REMOVE, trim, swap-out, swap-in. ``swap_file`` is a
        :class:`SwapFile` not yet sized, or the swap file's descriptor (kept open, not owned);
        either way the file's content is kept. Cost: a mapping and the journal, plus a scan of
        only the discard log's written pages -- never of every page. With ``tracking`` the
        successor fills write-protected again but knows no clean page (they were the dead
        handler's): the next enable copies them, nothing is taken on trust.
        """
        if isinstance(swap_file, int):
            swap_file = SwapFile(swap_file, None, owns_fd=False)
        return cls._build(regions, None, swap_file=swap_file, readahead=readahead,
                          max_readahead_bytes=max_readahead_bytes, workers=workers,
                          fill_threads=fill_threads, state=state, staging_fd=staging_fd,
                          fresh=False, tracking=tracking)

    @classmethod
    def _build(cls, regions: Sequence[tuple[RegionSpec, int]],
               swap_dir: str | os.PathLike[str] | None, *,
               swap_file: SwapFile | None, readahead: bool, max_readahead_bytes: int | None,
               workers: int | None, fill_threads: bool, state: PageState | None,
               staging_fd: int | None, fresh: bool, tracking: bool) -> PageHandler:
        if not regions:
            raise ValueError("the page handler needs at least one region")
        if max_readahead_bytes is not None and (
                max_readahead_bytes < PAGE_SIZE or not is_page_aligned(max_readahead_bytes)):
            raise ValueError(f"max_readahead_bytes must be a positive multiple of {PAGE_SIZE}, "
                             f"got {max_readahead_bytes}")
        specs = [spec for spec, _ in regions]
        validate_regions(specs)
        built: list[Region] = []
        base = 0
        page_sizes: set[int] = set()
        for spec, memfd in sorted(regions, key=lambda r: r[0].host_addr):
            # hugetlbfs: the kernel faults, fills and frees 2 MiB at a time, so every page
            # here is one; a region cutting a huge page could never be served.
            page_size = memfd_page_size(memfd)
            check_aligned(spec.host_addr, spec.size, page_size, "host region")
            check_aligned(spec.guest_addr, spec.size, page_size, "guest region")
            page_sizes.add(page_size)
            size = os.fstat(memfd).st_size
            if size < spec.size:
                raise ValueError(f"region [{spec.host_addr:#x}, {spec.host_end:#x}) is "
                                 f"{spec.size:#x} bytes but its memfd {memfd} holds {size:#x}")
            built.append(Region(spec, memfd, base, page_size))
            base += spec.size // page_size
        if len(page_sizes) > 1:
            raise ValueError(f"guest regions mix page sizes {sorted(page_sizes)}: one backing "
                             "per handler")
        ps = page_sizes.pop()
        if base > MAX_PAGES:
            raise ValueError(f"{base} guest pages exceed the swap file's limit of {MAX_PAGES}")
        owns_state = state is None
        if state is None:
            state = PageState.create(specs, ps)
        cleanup: list[Callable[[], None]] = [state.close] if owns_state else []
        try:
            state.check_regions(specs, ps)
            if fresh:
                state.reset()
            if staging_fd is None:
                staging = StagingMemory.over(create_staging_memfd(ps), state, fresh=True,
                                             owns_fd=True)
            else:
                staging = StagingMemory.over(staging_fd, state, fresh=fresh)
            cleanup.append(staging.close)
            if swap_file is None:
                swap_file = SwapFile.create(swap_dir or tempfile.gettempdir(), None,
                                            page_size=ps)
                cleanup.append(swap_file.close)
            swap_file.attach_state(state, fresh=fresh)
            state.next_generation()
            handler = cls(built, staging, swap_file, readahead=readahead,
                          max_readahead_bytes=max_readahead_bytes, workers=workers,
                          fill_threads=fill_threads, state=state, owns_state=owns_state,
                          tracking=tracking)
        except BaseException:
            for undo in reversed(cleanup):
                undo()
            raise
        if not fresh:
            handler.recover()
        return handler

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free staging, the swap file, the buffers. Idempotent. Region memfds stay open."""
        if self._closed:
            return
        self._closed = True
        self.filler.close()
        self._writer.close()
        self.staging.close()
        self.swap_file.close()
        self.bounce.close()
        self._zero.close()
        if self._owns_state and self.state is not None:
            self.state.close()

    def __enter__(self) -> PageHandler:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- lookup ---------------------------------------------------------------------------------
    def _huge_page_exists(self, dst: int, src: int) -> bool:
        """After COPY said EEXIST for the huge page at VMM address ``dst`` (see
        :func:`~vmmswap.dataplane.page_fill.huge_page_exists`)."""
        region = self.region_at(dst)
        return huge_page_exists(region.memfd, dst - region.host_addr, region.page_size, src)

    def region_at(self, addr: int) -> Region:
        """The region holding VMM address ``addr``; InvalidAddressError if none does."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            region = self.regions[i]
            if addr < region.host_end:
                return region
        raise InvalidAddressError(f"the address is invalid {addr:#018x}: it is in no guest "
                                  "region")

    def region_of_page(self, page: int) -> Region:
        """The region holding handler page index ``page``."""
        for region in self.regions:
            if region.base_page <= page < region.end_page:
                return region
        raise IndexError(f"page {page} is outside [0, {self.num_pages})")

    # --- counters -------------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self._from_staging = 0
        self._from_file = 0
        self._zeroed = 0
        self._redundant = 0
        self._readahead_pages = 0
        self.swapped_in_pages = 0
        self._readahead.reset()

    @property
    def journal(self) -> Journal | None:
        """The page state's journal (None without a shared page state)."""
        return self._journal

    @property
    def staging_pages(self) -> int:
        return self.staging.pages

    @property
    def swap_pages(self) -> int:
        return self.swap_file.current_pages

    @property
    def metadata_bytes(self) -> int:
        """Bytes of page-state arrays (staging bitmap and swap-file state)."""
        return self.staging.nbytes + self.swap_file.nbytes

    def resident_pages(self) -> int:
        """Pages present in guest memory (SEEK_DATA/SEEK_HOLE, or hugetlbfs' block count)."""
        return sum(resident_bytes(r.memfd, r.size, r.page_size) // r.page_size
                   for r in self.regions)

    def metrics(self) -> PageHandlerMetrics:
        return PageHandlerMetrics(
            resident_pages=self.resident_pages(),
            copied_from_file_pages=self._from_file,
            copied_from_staging_pages=self._from_staging,
            zeroed_pages=self._zeroed,
            redundant_pages=self._redundant,
            staging_pages=self.staging_pages,
            swap_pages=self.swap_pages,
            readahead_pages=self._readahead_pages,
            faults_avoided=self._readahead.faults_avoided,
            page_size=self.page_size,
        )

    # --- enable ---------------------------------------------------------------------------------
    def prepare_move(self, budget: int | None = None,
                     between: Callable[[], object] | None = None) -> move_prepare.Prepared:
        """Before the VMM is frozen for :meth:`move_to_staging`: allocate and map the staging
        pages the resident guest pages will move to (:mod:`vmmswap.dataplane.move_prepare`),
        so the frozen move only copies and punches. Optional, and changes no page's place;
        :meth:`release_prepared` undoes it if no move follows. ``between`` runs after every
        step of ~20 ms (the monitor serves faults there; they may call this handler).
        """
        self.check_open()
        prepared = move_prepare.prepare_staging(
            [move_prepare.PrepareRegion(r.memfd, r.size, r.base_page, r.page_size)
             for r in self.regions], self.staging, budget=budget, between=between)
        self._prepared = self._prepared or prepared.prepared_pages > 0
        crash_point("move.prepared")
        return prepared

    def release_prepared(self) -> None:
        """Free (soon, on the reclaimer thread) staging pages prepared for a move that will
        not happen."""
        if self._prepared and not self.staging.closed:
            self._prepared = False
            self.staging.sweep_leftovers()

    def move_to_staging(self) -> int:
        """Move every resident guest page to staging; returns the pages moved.

        Resets the fault counters (they count since the last enable, as in crosvm). Pages
        already in staging or the swap file stay there.

        **Safety**: every process that maps guest memory is frozen, and every uffd of those
        processes has every region registered, for the whole call. Otherwise a page written
        between copy and removal is lost, or an unregistered process reads zeros where data was.
        """
        self.check_open()
        self._reset_counters()
        self.epoch += 1
        self._writer.reset()
        if self.clean is not None and self.clean.bits.any():
            # release_clean was not called (or failed): a kept page is moved like any other.
            self.clean.take(None)
        released, self._released = self._released, None
        try:
            moved = move.move_to_staging(
                [move.MoveRegion(r.memfd, r.size, r.base_page, r.page_size)
                 for r in self.regions],
                self.staging, workers=self._workers, file_current=self.swap_file.current,
                skip=released)
        finally:
            # Prepared pages the move did not fill (their guest page was discarded meanwhile,
            # or released without a copy by dirty tracking).
            self.release_prepared()
        # A staged page is newer than any file copy (it came from the guest): never let both
        # claim the page. Normally there is nothing to clear.
        stale = self.swap_file.current.subtract(self.staging.present)
        if stale:
            _log.warning("%d staged pages also had a current file copy; the file copies were "
                         "marked stale", stale)
        return moved

    # --- faults ---------------------------------------------------------------------------------
    def handle_page_fault(self, uffd: Userfaultfd, addr: int, write: bool = False) -> None:
        """Serve a MISSING fault at VMM address ``addr``: staging, else the file, else zeros.

        Raises InvalidAddressError outside every region; MappingChangingError (the faulting
        page was not filled: read that uffd's events, handle REMOVE, retry); ProcessGoneError
        (the uffd's process is dead); another OSError if the page cannot be read or filled (the
        faulting thread stays blocked and a retry can serve it). When one of these is raised,
        the faulting page is still in its source; readahead neighbours that *were* filled
        before the error are accounted as filled (they are in guest memory now), which is the
        only consistent state, and a retry serves the rest.
        """
        region = self.region_at(addr)
        page = region.page_of(addr)  # the whole (huge) page is served
        self.staging.note_busy()
        if self.staging.present.get(page):
            self._serve_from(uffd, region, page, self.staging.present, self.staging.read,
                             self.staging.clear_range, "staging",
                             mapper=self.staging.map_pages)
        elif self.swap_file.is_current(page):
            self._serve_from(uffd, region, page, self.swap_file.current,
                             self.swap_file.read_pages, self.swap_file.clear_current, "file",
                             mapper=self.file_mapper)
        else:
            self._serve_zero(uffd, region, page, write)

    def _serve_from(self, uffd: Userfaultfd, region: Region, page: int,
                    present: PresentList, read: Callable[[int, int, memoryview], None],
                    clear: Callable[[int, int], None], source: str,
                    single: bool = False, mapper: MapFn | None = None) -> None:
        """Fill the faulting page and the run of neighbours in the same source (readahead)."""
        first, end, window = page, page + 1, 1
        if self.readahead_enabled and not single:
            window, direction = self._readahead.window(page)
            if window > 1:
                if direction == UP:
                    end = present.run_end(page + 1, min(page + window, region.end_page))
                else:
                    first = present.run_start(page, max(page - window + 1, region.base_page))
        focus = page - first
        count = end - first
        if count == 1:
            # One page (random access, or readahead off): no split, no bookkeeping of parts.
            parts = self.filler.fill(uffd, region.addr_of(page), page, 1, read, wake=True,
                                     focus=0, mapper=mapper)
        else:
            parts = self.filler.fill(uffd, region.addr_of(first), first, count, read,
                                     wake=True, focus=focus, mapper=mapper)
        crash_point("fault.filled")
        filled = 0
        for part in parts:
            if part.out.done:
                clear(first + part.offset, first + part.offset + part.out.done)
                if source == "file":
                    self.note_file_filled(uffd, first + part.offset, part.out)
            filled += part.out.filled
        if source == "staging":
            self._from_staging += filled
        else:
            self._from_file += filled
        mine = parts[0] if len(parts) == 1 else next(
            p for p in parts if p.offset <= focus < p.offset + p.count)
        if mine.out.done <= focus - mine.offset:
            # The faulting page was not reached (pages settled anyway are accounted above).
            error = mine.out.error
            assert error is not None
            if count > 1 and not isinstance(error, MappingChangingError | ProcessGoneError):
                # A COPY of many pages can fail where one of a single page would not (the run
                # crosses a VMA boundary of the faulting process, say): serve just the fault.
                _log.debug("readahead fill at %#x failed (%s); serving one page",
                           region.addr_of(first), error)
                self._serve_from(uffd, region, page, present, read, clear, source, single=True,
                                 mapper=mapper)
                return
            raise error
        if mine.out.focus_existed:
            # Someone filled the page first (another uffd's fault, or readahead): the COPY
            # did not wake this waiter.
            uffd.wake(region.addr_of(page), self.page_size)
            self._redundant += 1
            self._readahead_pages += filled
        else:
            self._readahead_pages += filled - 1
        if self.readahead_enabled:
            lo, hi = (0, mine.out.done) if count == 1 else settled_block(parts, focus)
            self._readahead.record(first + lo, first + hi, window)
        for part in parts:
            if part.out.error is not None:
                # The faulting page is served; only readahead stopped early, and its pages
                # stayed in their source. A dead process is the caller's business.
                if isinstance(part.out.error, ProcessGoneError):
                    raise part.out.error
                _log.debug("readahead around %#x stopped: %s", region.addr_of(page),
                           part.out.error)

    def _serve_zero(self, uffd: Userfaultfd, region: Region, page: int, write: bool) -> None:
        addr = region.addr_of(page)
        ps = self.page_size
        window = self._readahead.window(page)[0] if self.readahead_enabled else 1
        try:
            if write or ps != PAGE_SIZE:
                # A zero page would be copy-on-write faulted again at once: give a real one.
                # hugetlbfs has no ZEROPAGE (EINVAL): its zeros are always a COPY.
                uffd.copy(addr, ps, self._zero.address, True)
            else:
                uffd.zero(addr, ps, True)
            self._zeroed += 1
        except PageExistsError:
            uffd.wake(addr, ps)
            self._redundant += 1
        if self.readahead_enabled:
            self._readahead.record(page, page + 1, window)

    # --- trim, swap out, swap in ----------------------------------------------------------------
    def start_trim(self) -> TrimContext:
        """A resumable trim of staging: drop zero pages and pages equal to their file copy."""
        self.check_open()
        return TrimContext(self)

    def swap_out(self, max_bytes: int = MAX_SWAP_CHUNK_BYTES) -> int:
        """Write up to ``max_bytes`` of staging to the swap file; returns pages written.

        0 means staging is empty. One chunk per call, so the monitor serves faults in between
        (the next chunk is read ahead meanwhile, see :mod:`vmmswap.dataplane.swap_out`). On OSError
        (ENOSPC, EIO) nothing changed: every page is still in staging.
        """
        self.check_open()
        self.staging.note_busy()  # free the written pages once swap-out pauses
        return self._writer.step(max_bytes, self.epoch)

    def start_swap_in(self) -> SwapInContext:
        """A resumable swap-in of every staged and swapped page (see :class:`SwapInContext`)."""
        self.check_open()
        return SwapInContext(self)

    # --- helpers for the contexts ---------------------------------------------------------------
    def check_open(self) -> None:
        if self._closed:
            raise ValueError("the page handler is closed")

    def note_swapped_in(self, pages: int) -> None:
        self.swapped_in_pages += pages

    def __repr__(self) -> str:
        return (f"<PageHandler regions={len(self.regions)} pages={self.num_pages} "
                f"staging={self.staging_pages} swap={self.swap_pages}>")
