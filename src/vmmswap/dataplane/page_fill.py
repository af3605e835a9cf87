"""Filling a run of guest pages with UFFDIO_COPY, through partial results and existing pages.

One ioctl usually fills the whole run. The kernel stops early in two benign cases, and this
module turns both into progress instead of errors:

* a *partial* result (EAGAIN with a positive count): the first ``count`` bytes were filled; the
  page after them is usually one that already exists;
* EEXIST on the first page of a (re)try: that page is already in guest memory.

A page that already exists is *skipped*, and the caller drops it from its source. crosvm treats
COPY EEXIST as an inconsistency, because with one page per fault it can only mean a bug. With
readahead and several processes faulting at once it is ordinary: another uffd's fault may have
filled the page, and the guest may already have written to it. The guest's page is what the guest
sees, so it is authoritative; the staged or swapped copy can never be served again (COPY never
overwrites), and keeping it would only make swap-out write and swap-in skip a dead page.

Anything else (a changing address space, a dead process, ENOMEM, ...) stops the run: the pages
not yet settled stay in their source, so a retry can still serve them.

On hugetlbfs EEXIST is not proof: when the kernel cannot allocate the huge page (the pool or a
hugetlb cgroup limit is exhausted) and the page table is there, COPY answers EEXIST for a page
that is *not* there (measured on 6.18: a cgroup limited to one huge page, the second COPY is
EEXIST and the page stays missing). Trusting it would drop the only copy and serve zeros next.
So a huge-page fill takes an ``exists`` check, which looks at the page itself, and a page it
does not find is an error (ENOMEM, retried later) instead of a skip.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import numpy as np

from vmmswap.uffd.errors import PageExistsError, PartialFillError
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd


class Bounce:
    """A populated, private buffer: where staging and swap-file pages land before a COPY.

    **Safety**: it is this process's own anonymous memory and is never registered with
    userfaultfd, so reading into it can never fault into the handler itself.
    """

    def __init__(self, size: int, page_size: int = PAGE_SIZE) -> None:
        self.mapping = Mapping.anonymous(size, populate=True)
        self.address = self.mapping.address
        #: Whole guest pages of ``page_size`` bytes the buffer holds.
        self.pages = self.mapping.length // page_size
        self.view = memoryview(self.mapping.as_ctypes()).cast("B")

    def close(self) -> None:
        self.view.release()
        self.mapping.close()


@dataclass(slots=True)
class FillOutcome:
    """What a run fill did; pages ``[0, done)`` of the run are settled (filled or existing)."""

    done: int = 0
    filled: int = 0
    existed: int = 0
    #: The focus page (the faulting one) already existed: a redundant fault.
    focus_existed: bool = False
    #: Why the fill stopped before ``done`` reached the run length; None when it did not.
    error: OSError | None = None


#: ``exists(dst, src)``: whether the huge page at VMM address ``dst`` is really in guest memory
#: after a COPY from ``src`` (this process) answered EEXIST.
ExistsFn = Callable[[int, int], bool]


def copy_run(uffd: Userfaultfd, dst: int, src: int, pages: int, *, wake: bool,
             focus: int = 0, page_size: int = PAGE_SIZE,
             exists: ExistsFn | None = None, write_protect: bool = False) -> FillOutcome:
    """COPY ``pages`` pages from ``src`` (this process) to ``dst`` (the uffd owner's memory).

    ``page_size`` is the guest's page: on hugetlbfs memory the kernel fills (and reports
    partial progress and EEXIST in) whole huge pages only, so the run is counted in them.

    ``focus`` is the index of the page someone waits for (the faulting page), for
    :attr:`FillOutcome.focus_existed`. ``write_protect`` maps the filled pages write-protected
    (COPY_MODE_WP: dirty tracking, see :mod:`.dirty`). Never raises for the kernel's answers:
    errors land in :attr:`FillOutcome.error` so that the caller can first account for the pages
    already settled.
    """
    out = FillOutcome()
    while out.done < pages:
        offset = out.done * page_size
        try:
            if write_protect:
                uffd.copy(dst + offset, (pages - out.done) * page_size, src + offset, wake,
                          True)
            else:
                uffd.copy(dst + offset, (pages - out.done) * page_size, src + offset, wake)
        except PartialFillError as err:
            n = err.bytes_done // page_size
            out.done += n
            out.filled += n
            continue
        except PageExistsError as err:
            if exists is not None and not exists(dst + offset, src + offset):
                out.error = OSError(errno.ENOMEM, f"UFFDIO_COPY at {dst + offset:#x} answered "
                                    "EEXIST but the huge page is not there: no huge page "
                                    "could be allocated (hugetlb pool or cgroup limit "
                                    "exhausted); the page stays in its source")
                out.error.__cause__ = err
                return out
            if out.done == focus:
                out.focus_existed = True
            out.done += 1
            out.existed += 1
            continue
        except OSError as err:
            out.error = err
            return out
        out.filled += pages - out.done
        out.done = pages
    return out


def huge_page_exists(memfd: int, offset: int, page_size: int, src: int) -> bool:
    """After COPY said EEXIST for the huge page at ``offset`` of ``memfd``: is it there?

    On hugetlbfs the kernel also says EEXIST when it could not allocate the page (see the
    module docstring), so look: read the page through the memfd (a hole reads as zeros,
    nothing is allocated). Data there means the page exists -- the guest's version wins.
    Zeros there exist harmlessly only if our copy at ``src`` (this process) is zeros too (a
    hole then faults to the same zeros); otherwise the page is taken as missing and the fill
    fails, keeping our copy: a real page the guest zeroed whole since a racing fill would only
    keep its fault retried, never lose data.
    """
    page = bytearray(page_size)
    if os.preadv(memfd, [page], offset) != page_size:
        return False
    if np.frombuffer(page, dtype=np.uint64).any():
        return True
    ours = np.ctypeslib.as_array((ctypes.c_uint64 * (page_size // 8)).from_address(src))
    return not ours.any()


def fills_protected(uffd: Userfaultfd) -> bool:
    """Whether fills through ``uffd`` are write-protected (its ranges are registered
    MISSING | WP for dirty tracking; a stand-in without the attribute: no)."""
    return bool(getattr(uffd, "write_protect_fills", False))


#: Runs at least this long (in bytes, and of two pages or more) are filled by two threads: a
#: fill of 1 MiB takes ~250 us here, a hand-off to the helper thread ~30-60 us.
MIN_SPLIT_BYTES: Final = 1024 * 1024

ReadFn = Callable[[int, int, memoryview], None]
#: Maps source pages ``[first, end)`` somewhere COPY can read them directly: the address and
#: a function that unmaps it again; or None where it cannot (the caller reads instead).
MapFn = Callable[[int, int], "tuple[int, Callable[[], None]] | None"]


@dataclass(slots=True)
class Part:
    """One piece of a run: pages ``[offset, offset + count)`` of it, and what the fill did."""

    offset: int
    count: int
    out: FillOutcome


class RunFiller:
    """Reads a run of pages from its source into the bounce buffer and COPYs it to the guest.

    A long run is split in two halves, one filled by the calling thread and one by a helper
    thread, each reading and copying its own half (``preadv`` and the ioctl release the GIL).
    The guest is blocked on the fault meanwhile, so the second CPU is otherwise idle, and one
    COPY stream is bound by page allocation, not by memory bandwidth.

    **Safety**: ``bounce`` is this process's own populated memory, never registered with
    userfaultfd; the two halves use disjoint parts of it.
    """

    def __init__(self, bounce_address: int, bounce_view: memoryview, *,
                 threads: bool = True, page_size: int = PAGE_SIZE,
                 exists: ExistsFn | None = None) -> None:
        self._exists = exists
        self._address = bounce_address
        self._view = bounce_view
        self._page_size = page_size
        self._min_split = max(2, MIN_SPLIT_BYTES // page_size)
        self._threads = threads and (os.cpu_count() or 1) > 1
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _one(self, uffd: Userfaultfd, dst: int, first: int, count: int, at: int, read: ReadFn,
             wake: bool, focus: int, mapper: MapFn | None = None) -> FillOutcome:
        """Read source pages ``[first, first + count)`` into the bounce buffer at page ``at``,
        then COPY them to ``dst``.

        With huge pages, each page is read (or mapped) and copied on its own, in order: a
        2 MiB COPY wakes the threads waiting for that page as soon as it is in, so the guest
        works through the run while its rest is still being filled, instead of waiting for
        all of it (one ioctl per 2 MiB costs nothing next to the copy).

        With a ``mapper`` the source is COPYed from where it maps it (one copy instead of a
        read and a copy); where it cannot map, the pages are read as usual.
        """
        ps = self._page_size
        if count > 1 and ps > PAGE_SIZE:
            total = FillOutcome()
            for i in range(count):
                out = self._one(uffd, dst + i * ps, first + i, 1, at + i, read, wake,
                                0 if i == focus else -1, mapper)
                total.done += out.done
                total.filled += out.filled
                total.existed += out.existed
                total.focus_existed = total.focus_existed or out.focus_existed
                if out.error is not None:
                    total.error = out.error
                    break
            return total
        try:
            mapped = mapper(first, first + count) if mapper is not None else None
        except OSError as err:
            return FillOutcome(error=err)
        if mapped is not None:
            address, release = mapped
            try:
                return copy_run(uffd, dst, address, count, wake=wake, focus=focus, page_size=ps,
                                exists=self._exists, write_protect=fills_protected(uffd))
            finally:
                release()
        buf = self._view[at * ps:(at + count) * ps]
        try:
            read(first, first + count, buf)
        except OSError as err:
            return FillOutcome(error=err)
        return copy_run(uffd, dst, self._address + at * ps, count, wake=wake,
                        focus=focus, page_size=ps, exists=self._exists,
                        write_protect=fills_protected(uffd))

    def _pool_submit(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmmswap-fill")
        return self._pool

    def fill(self, uffd: Userfaultfd, dst: int, first: int, count: int, read: ReadFn, *,
             wake: bool, focus: int = -1, mapper: MapFn | None = None) -> list[Part]:
        """Fill pages ``[first, first + count)`` of the source to ``dst``; returns the parts.

        ``focus`` (an index in the run, or -1) is the page someone waits for; the part holding
        it is filled by the calling thread.
        """
        if not self._threads or count < self._min_split:
            return [Part(0, count, self._one(uffd, dst, first, count, 0, read, wake, focus,
                                             mapper))]
        half = count // 2
        halves = [(0, half), (half, count - half)]
        mine, theirs = (halves if focus < half else halves[::-1])
        future = self._pool_submit().submit(
            self._one, uffd, dst + theirs[0] * self._page_size, first + theirs[0], theirs[1],
            theirs[0], read, wake, -1, mapper)
        own = self._one(uffd, dst + mine[0] * self._page_size, first + mine[0], mine[1], mine[0],
                        read, wake, focus - mine[0], mapper)
        other = future.result()
        parts = [Part(mine[0], mine[1], own), Part(theirs[0], theirs[1], other)]
        parts.sort(key=lambda p: p.offset)
        return parts

    def fill_runs(self, uffd: Userfaultfd, runs: list[tuple[int, int, int]], read: ReadFn, *,
                  wake: bool, mapper: MapFn | None = None) -> list[list[Part]]:
        """Fill several ``(dst, first, count)`` runs (at most a bounce buffer in all).

        Nobody waits for these pages (swap-in): with several runs, each thread takes whole runs,
        about half of the pages each, so one hand-off serves them all; a single long run is
        split instead. Returns the parts of each run.
        """
        total = sum(count for _dst, _first, count in runs)
        ats: list[int] = []
        at = 0
        for _dst, _first, count in runs:
            ats.append(at)
            at += count
        if len(runs) == 1:
            dst, first, count = runs[0]
            return [self.fill(uffd, dst, first, count, read, wake=wake, mapper=mapper)]

        def work(indexes: range) -> list[list[Part]]:
            return [[Part(0, runs[i][2], self._one(uffd, runs[i][0], runs[i][1], runs[i][2],
                                                   ats[i], read, wake, -1, mapper))]
                    for i in indexes]

        if not self._threads or total < self._min_split:
            return work(range(len(runs)))
        cut = next((i for i, a in enumerate(ats) if a >= total // 2), len(runs) - 1) or 1
        future = self._pool_submit().submit(work, range(cut, len(runs)))
        own = work(range(cut))
        return own + future.result()


def settled_block(parts: list[Part], focus: int) -> tuple[int, int]:
    """The contiguous stretch of settled pages around ``focus`` (offsets in the run).

    ``(focus, focus)`` when the focus page itself was not settled.
    """
    settled = [(p.offset, p.offset + p.out.done) for p in parts if p.out.done]
    lo = hi = focus
    for start, end in settled:
        if start <= focus < end:
            lo, hi = start, end
    if lo == hi:
        return focus, focus
    changed = True
    while changed:
        changed = False
        for start, end in settled:
            if end == lo and start < lo:
                lo, changed = start, True
            if start == hi and end > hi:
                hi, changed = end, True
    return lo, hi
