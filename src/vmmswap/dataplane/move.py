"""Moving guest memory to staging (the data half of ``enable``).

Only the *data* extents of each guest memfd are visited (SEEK_DATA / SEEK_HOLE), so the cost
follows resident memory, not guest size: a 16 GiB guest with 512 MiB resident moves 512 MiB.
Extents are grouped into batches; a worker copies a batch's extents into staging with
``copy_file_range`` (memfd to memfd inside the kernel: no mapping of either side, so no page
fault and no page-table update in this process), then removes the batch's span of guest memory
with one hole punch (what MADV_REMOVE does on shmem, minus the need for a writable mapping).

**Batches never split a huge page.** Removing part of a transparent huge page zeroes the
subpages without splitting the page, so they stay mapped: the VMM's next access does not fault
and the guest reads zeros where its data was (crosvm commit e835633bf). A batch is therefore a
sequence of whole THP-aligned windows, and only whole windows (or the tail of a region) are ever
punched. Windows with no data between two data windows are punched too (they are holes; punching
a hole is cheap), which keeps the syscall count per batch at one.

**hugetlbfs regions** (a page size above 4 KiB) are moved whole huge page by whole huge page
through a buffer instead (:mod:`vmmswap.dataplane.move_hugetlb`: no ``copy_file_range``, no
SEEK_DATA there), and their all-zero huge pages are not staged. Staging page indexes count the
region's own pages.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.dataplane.crash_points import crash_point
from vmmswap.dataplane.guest_memory import data_ranges, resident_bytes
from vmmswap.dataplane.move_hugetlb import HugeBuffers, plan_spans, stage_span
from vmmswap.dataplane.present_list import PresentList, runs_of
from vmmswap.dataplane.staging import StagingMemory
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import (
    PAGE_SIZE,
    THP_SIZE,
    hugepage_round_down,
    hugepage_round_up,
)

_log = logging.getLogger(__name__)

#: Bytes of data per batch: big enough that per-batch overhead (a task hand-off, one punch)
#: vanishes, small enough that both workers get many batches.
DEFAULT_BATCH_BYTES: Final = 8 * 1024 * 1024
_PUNCH: Final = libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE
#: The wrong order, for the crash test's negative control only (tests/dataplane): mark the
#: staged pages present after the punch, so a crash in between loses them. Never set it.
MARK_AFTER_PUNCH = False


@dataclass(slots=True)
class MoveBatch:
    """Copies of one batch (byte ranges of the region) and the span removed afterwards."""

    copies: list[tuple[int, int]] = field(default_factory=list)
    remove_start: int = 0
    remove_end: int = 0

    @property
    def copy_bytes(self) -> int:
        return sum(end - start for start, end in self.copies)


def plan_batches(extents: Iterable[tuple[int, int]], region_size: int,
                 batch_bytes: int = DEFAULT_BATCH_BYTES) -> list[MoveBatch]:
    """Group data extents (byte offsets in a region, ascending) into THP-whole batches.

    Every batch's removal span starts on a THP boundary and ends on one or at the region end;
    spans never overlap, and every copied byte lies inside its batch's span.
    """
    batches: list[MoveBatch] = []
    cur = MoveBatch()
    cur_bytes = 0
    cur_window = -1  # start offset of the THP window the batch's last piece is in

    def flush() -> None:
        nonlocal cur, cur_bytes
        if cur.copies:
            cur.remove_start = hugepage_round_down(cur.copies[0][0])
            cur.remove_end = min(hugepage_round_up(cur.copies[-1][1]), region_size)
            batches.append(cur)
        cur = MoveBatch()
        cur_bytes = 0

    for start, end in extents:
        if not 0 <= start < end <= region_size:
            raise ValueError(f"extent [{start:#x}, {end:#x}) is outside the region "
                             f"[0, {region_size:#x})")
        pos = start
        while pos < end:
            window = hugepage_round_down(pos)
            piece_end = min(end, window + THP_SIZE)
            # A batch may end only between windows: never inside the window of its last piece.
            if window != cur_window and cur_bytes >= batch_bytes:
                flush()
            if cur.copies and cur.copies[-1][1] == pos:
                cur.copies[-1] = (cur.copies[-1][0], piece_end)
            else:
                cur.copies.append((pos, piece_end))
            cur_bytes += piece_end - pos
            cur_window = window
            pos = piece_end
    flush()
    return batches


@dataclass(slots=True)
class MoveRegion:
    """What the mover needs of one region."""

    memfd: int
    size: int
    base_page: int  # first staging page of the region
    page_size: int = PAGE_SIZE  # the region's page; above 4 KiB it is hugetlbfs

    @property
    def hugetlb(self) -> bool:
        return self.page_size > PAGE_SIZE

    def page_of(self, offset: int) -> int:
        """The staging page of a byte offset in the region."""
        return self.base_page + offset // self.page_size


class _PunchError(Exception):
    """The copies of a batch succeeded but removing the guest's pages failed."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Marker:
    """Marks staged pages present from the worker threads (a bitmap word may be shared by
    two regions' batches, and a word update is a read and a write)."""

    def __init__(self, staging: StagingMemory, file_current: PresentList | None,
                 skip: npt.NDArray[np.bool_] | None = None) -> None:
        self.staging = staging
        self.file_current = file_current
        self.skip = skip
        self.lock = threading.Lock()

    def skipped(self, page: int) -> bool:
        """A page to punch without staging: its current copy is in the file (dirty
        tracking's released pages)."""
        return self.skip is not None and bool(self.skip[page])

    def zero_released(self, page: int) -> None:
        """A released hugetlbfs page read as zeros (a hole the VMM punched, or zeros): the
        zeros are its content, so its file copy is current no more; then it is punched."""
        with self.lock:
            if self.file_current is not None:
                self.file_current.clear_range(page, page + 1)

    def mark(self, region: MoveRegion, copies: list[tuple[int, int]]) -> None:
        with self.lock:
            for start, end in copies:
                first = region.page_of(start)
                self.staging.mark_present(first, first + (end - start) // region.page_size)

    def held_elsewhere(self, page: int) -> bool:
        """Whether staging or the file holds a copy of ``page`` (a hugetlbfs page that read
        as zeros may be a hole whose data is there: it must not be punched, see below)."""
        with self.lock:
            return self.staging.present.get(page) or (
                self.file_current is not None and self.file_current.get(page))


def _punch_spans(region: MoveRegion, batch: MoveBatch, marker: _Marker) -> list[tuple[int, int]]:
    """The byte spans of the batch to punch out of guest memory.

    Small pages: the whole span (holes in it are no-ops). hugetlbfs: the staged huge pages,
    and those that read as zeros only if nothing else holds a copy -- a zero page with a staged
    or current file copy is either a hole (the copy is the data: punching is a no-op anyway)
    or, after a crash left that copy stale, a resident page of zeros that must stay: punching
    it would let the stale copy be served.
    """
    if not region.hugetlb:
        return [(batch.remove_start, batch.remove_end)]
    ps = region.page_size
    staged = {off for start, end in batch.copies for off in range(start, end, ps)}
    spans: list[tuple[int, int]] = []
    for off in range(batch.remove_start, batch.remove_end, ps):
        page = region.page_of(off)
        if off not in staged and not marker.skipped(page) and marker.held_elsewhere(page):
            continue
        if spans and spans[-1][1] == off:
            spans[-1] = (spans[-1][0], off + ps)
        else:
            spans.append((off, off + ps))
    return spans


def _run_batch(staging: StagingMemory, region: MoveRegion, batch: MoveBatch,
               buffers: HugeBuffers | None, marker: _Marker) -> None:
    if buffers is not None:
        # hugetlbfs: the batch's copies are the non-zero huge pages, found as they are read.
        stage_span(staging, region.memfd, region.base_page, batch.remove_start,
                   batch.remove_end, buffers, batch.copies, marker.skipped,
                   marker.zero_released)
    else:
        for start, end in batch.copies:
            staging.copy_in(region.memfd, start, region.page_of(start), end - start)
    crash_point("move.copied")
    spans = _punch_spans(region, batch, marker)
    # The copies are complete; they are marked present *before* the punch (crash
    # consistency: a successor must find every punched page in staging). Until the punch,
    # guest memory and staging hold the same bytes and the guest's copy wins (it does not
    # fault), so a crash in between loses nothing.
    if not MARK_AFTER_PUNCH:
        marker.mark(region, batch.copies)
        crash_point("move.marked")
    try:
        for start, end in spans:
            libc.fallocate(region.memfd, _PUNCH, start, end - start)
    except OSError as err:
        raise _PunchError(err) from err
    crash_point("move.punched")
    if MARK_AFTER_PUNCH:
        marker.mark(region, batch.copies)


def _without(copies: list[tuple[int, int]], region: MoveRegion,
             skip: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``copies`` (byte ranges of ``region``) minus the pages ``skip`` names."""
    out: list[tuple[int, int]] = []
    for start, end in copies:
        first, last = region.page_of(start), region.page_of(end)
        keep = ~skip[first:last]
        if keep.all():
            out.append((start, end))
            continue
        for a, b in runs_of(np.flatnonzero(keep)):
            out.append((start + a * PAGE_SIZE, start + b * PAGE_SIZE))
    return out


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Data extents of a memfd in ``[0, size)``, from SEEK_DATA/SEEK_HOLE."""
    return list(data_ranges(fd, size))


def _settle_failed_batch(staging: StagingMemory, region: MoveRegion, batch: MoveBatch,
                         punch_failed: bool) -> int:
    """Make every page of a failed batch recoverable from one place; returns pages staged.

    If the copies failed, nothing was marked or punched: the guest keeps everything and
    staging frees its partial copies. If the punch failed, every copy was already marked
    present and stays so: a page the punch removed lives in staging only, one it did not is
    in both with the same bytes, and the guest's copy wins (it never faults; swap-in's COPY
    meets EEXIST and keeps it) -- no need to ask which pages the punch reached.
    """
    ps = region.page_size
    if punch_failed:
        if MARK_AFTER_PUNCH:
            for start, end in batch.copies:
                first = region.page_of(start)
                staging.mark_present(first, first + (end - start) // ps)
        return sum((end - start) // ps for start, end in batch.copies)
    for start, end in batch.copies:
        first = region.page_of(start)
        try:
            staging.punch(first, first + (end - start) // ps)
        except OSError as err:
            _log.warning("freeing staging after a failed move: %s", err)
    return 0


def _wait(future: Future[None]) -> tuple[BaseException | None, BaseException | None]:
    """Wait for a batch, whatever happens to this thread meanwhile.

    Returns the batch's own exception (or None) and an exception that interrupted the wait
    (KeyboardInterrupt, say), to re-raise once every batch is accounted: a batch that is still
    running may punch the guest at any moment, so giving up on it would lose its pages.
    """
    interrupt: BaseException | None = None
    while not future.done():
        try:
            wait([future])
        except BaseException as err:
            interrupt = interrupt or err
    return future.exception(), interrupt


def move_to_staging(regions: Sequence[MoveRegion], staging: StagingMemory, *,
                    workers: int | None = None,
                    batch_bytes: int = DEFAULT_BATCH_BYTES,
                    file_current: PresentList | None = None,
                    skip: npt.NDArray[np.bool_] | None = None) -> int:
    """Move every data page of every region into staging; returns pages moved.

    Batches run on ``workers`` threads (default: one per CPU; the copies and punches are
    system calls that release the GIL). A batch's pages are marked present in staging after
    its copies and *before* its punch, so a crash at any instant leaves every page in guest
    memory, in staging, or in both with the same bytes (the guest's copy wins); a failed copy
    leaves its batch in the guest (nothing marked or punched), and the staging copy is freed
    again. ``file_current`` (the swap file's bitmap) keeps hugetlbfs zero pages that have a
    copy elsewhere unpunched (see _punch_spans). ``skip`` (one slot per page, 4 KiB regions)
    names pages that are punched but not copied: their current copy is already in the swap
    file (dirty tracking's clean pages, see :mod:`.kept_file`); the batches still cover them,
    so they are punched in the same few calls, on the same threads, as the rest (on hugetlbfs
    a skipped page is read first, and one that reads as zeros leaves the file too).
    The first error is raised once every started batch has finished.

    **Safety**: every process that maps guest memory must be frozen and every uffd registered
    for the whole call. A page written between its copy and the punch would be lost, and a
    process whose range is not registered would later read zeros instead of faulting.
    """
    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, 8))
    # A punch still pending from a page that left staging must not hit the new copy.
    staging.flush()
    jobs: list[tuple[MoveRegion, MoveBatch]] = []
    for region in regions:
        if region.hugetlb:
            if resident_bytes(region.memfd, region.size, region.page_size):
                jobs.extend((region, MoveBatch([], start, end))
                            for start, end in plan_spans(region.size, region.page_size,
                                                         batch_bytes))
            continue
        for batch in plan_batches(data_extents(region.memfd, region.size), region.size,
                                  batch_bytes):
            if skip is not None:
                batch.copies = _without(batch.copies, region, skip)
            jobs.append((region, batch))
    if not jobs:
        return 0
    workers = min(workers, len(jobs))
    huge_sizes = {r.page_size for r, _ in jobs if r.hugetlb}
    buffers = {ps: HugeBuffers(workers, ps) for ps in huge_sizes}
    try:
        return _run_jobs(jobs, staging, workers, buffers,
                         _Marker(staging, file_current, skip))
    finally:
        for buf in buffers.values():
            buf.close()


def _run_jobs(jobs: list[tuple[MoveRegion, MoveBatch]], staging: StagingMemory, workers: int,
              buffers: dict[int, HugeBuffers], marker: _Marker) -> int:
    """Run the batches on ``workers`` threads; returns pages moved (see move_to_staging)."""
    moved = 0
    first_error: BaseException | None = None
    futures: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmmswap-move") as pool:
        try:
            for region, batch in jobs:
                futures.append(pool.submit(_run_batch, staging, region, batch,
                                           buffers.get(region.page_size), marker))
        except BaseException as err:
            # Not every batch could be handed out (no thread could be started, say). The
            # ones that were still run -- copy *and punch* -- so they are accounted below;
            # the others stay in the guest.
            first_error = err
            _log.error("moving to staging stopped after %d of %d batches: %s", len(futures),
                       len(jobs), err)
        for (region, batch), future in zip(jobs, futures, strict=False):
            error, interrupt = _wait(future)
            if interrupt is not None and first_error is None:
                first_error = interrupt
            if error is not None:
                punch_failed = isinstance(error, _PunchError)
                cause = error.cause if isinstance(error, _PunchError) else error
                if first_error is None:
                    first_error = cause
                _log.error("moving [%#x, %#x) of memfd %d to staging failed: %s",
                           batch.remove_start, batch.remove_end, region.memfd, cause)
                moved += _settle_failed_batch(staging, region, batch, punch_failed)
                continue
            moved += sum((end - start) // region.page_size for start, end in batch.copies)
    if first_error is not None:
        raise first_error
    return moved
