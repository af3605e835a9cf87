"""Moving hugetlbfs guest memory to staging: whole huge pages, read through a buffer.

:mod:`vmmswap.dataplane.move` moves small-page (and THP) memory with ``copy_file_range`` over
the data extents SEEK_DATA / SEEK_HOLE report. On hugetlbfs neither works (measured on 6.18):

* ``copy_file_range`` from a hugetlbfs file fails with EXDEV (hugetlbfs has no splice), so a
  huge page is read with ``preadv`` into a buffer of this process and written to staging;
* SEEK_DATA reports the whole file as data, holes included, so the resident huge pages cannot
  be listed. Every huge page of the region is read instead: a hole reads as zeros without being
  allocated, costs a ``memset`` of 2 MiB, and is then skipped like a resident page of zeros.

A huge page that reads as all zeros is therefore not staged at all (it is punched with the
rest, and a later fault fills it with zeros): enable on hugetlbfs does trim's zero check on the
way, which is what keeps staging from holding a zero copy of every hole of a sparse guest.

The guest's span is punched only after every non-zero huge page of the batch is in staging;
punches are whole huge pages (a partial punch of a hugetlbfs page zeroes it in place).
"""

from __future__ import annotations

import errno
import os
import queue
from collections.abc import Callable

import numpy as np

from vmmswap.dataplane.page_fill import Bounce
from vmmswap.dataplane.staging import StagingMemory


def plan_spans(region_size: int, page_size: int, batch_bytes: int) -> list[tuple[int, int]]:
    """The region cut into ``(start, end)`` byte spans of whole huge pages, about
    ``batch_bytes`` each (at least one huge page)."""
    if region_size % page_size:
        raise ValueError(f"a hugetlbfs region of {region_size:#x} bytes is not a whole number "
                         f"of {page_size:#x}-byte pages")
    step = max(page_size, batch_bytes - batch_bytes % page_size)
    return [(start, min(start + step, region_size)) for start in range(0, region_size, step)]


class HugeBuffers:
    """One huge-page-sized read buffer per worker thread, handed out and taken back.

    **Safety**: the buffers are this process's own populated memory, never registered with
    userfaultfd.
    """

    def __init__(self, count: int, page_size: int) -> None:
        self.page_size = page_size
        self._all = [Bounce(page_size, page_size) for _ in range(count)]
        self._free: queue.SimpleQueue[Bounce] = queue.SimpleQueue()
        for buf in self._all:
            self._free.put(buf)

    def take(self) -> Bounce:
        return self._free.get()

    def give(self, buf: Bounce) -> None:
        self._free.put(buf)

    def close(self) -> None:
        for buf in self._all:
            buf.close()
        self._all.clear()


def _read_page(fd: int, offset: int, buf: memoryview) -> None:
    done = 0
    while done < buf.nbytes:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise OSError(errno.EIO, f"reading guest memory at {offset + done:#x} returned "
                          "nothing: the memfd is shorter than its region")
        done += got


def is_zero(buf: memoryview) -> bool:
    """Whether every byte of ``buf`` (a multiple of 8 bytes) is zero."""
    words = np.frombuffer(buf, dtype=np.uint64)
    return not (words[0] or words.any())


def stage_span(staging: StagingMemory, memfd: int, base_page: int, start: int, end: int,
               buffers: HugeBuffers, copies: list[tuple[int, int]],
               skipped: Callable[[int], bool] | None = None,
               zero_skipped: Callable[[int], None] | None = None) -> None:
    """Copy the non-zero huge pages of ``[start, end)`` (bytes of the region) to staging.

    Each staged page's byte range is appended to ``copies`` as soon as it is in staging, so
    a failure half-way leaves ``copies`` naming exactly what staging holds. Pages
    ``skipped(page)`` names are not staged (their copy is elsewhere); one of them that reads
    as zeros is reported to ``zero_skipped`` (its zeros are its content now).
    """
    ps = buffers.page_size
    buf = buffers.take()
    try:
        view = buf.view[:ps]
        for offset in range(start, end, ps):
            page = base_page + offset // ps
            _read_page(memfd, offset, view)
            if skipped is not None and skipped(page):
                if zero_skipped is not None and is_zero(view):
                    zero_skipped(page)
                continue
            if is_zero(view):
                continue
            staging.write(base_page + offset // ps, view)
            if copies and copies[-1][1] == offset:
                copies[-1] = (copies[-1][0], offset + ps)
            else:
                copies.append((offset, offset + ps))
    finally:
        buffers.give(buf)
