"""Selftests ``move`` and ``move-pmd``: MISSING faults resolved with UFFDIO_MOVE.

MOVE only works inside the process that owns the memory, so the whole scenario runs in a forked
child: a handler thread moves pages while the main thread faults through ctypes (GIL released).
"""

from __future__ import annotations

import contextlib
import ctypes
import struct

import pytest
from uffd_helpers import handler_thread, keep_alive, read_bytes, require, run_in_child

from vmmswap.kernel import libc
from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.events import Event, PageFault
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import (
    PAGE_SIZE,
    THP_SIZE,
    bytes_to_pages,
    hugepage_round_up,
    pages_to_bytes,
)
from vmmswap.uffd.userfaultfd import Userfaultfd

COUNTER = struct.Struct("=Q")


def aligned(length: int, align: int) -> int:
    """An address of ``length`` bytes aligned to ``align``, carved from a larger mapping."""
    spare = keep_alive(Mapping.anonymous(length + align))
    return hugepage_round_up(spare.address) if align == THP_SIZE else spare.address


def anon_huge_bytes(start: int, length: int) -> int:
    """AnonHugePages of the mappings inside [start, start + length), from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = start <= low and high <= start + length
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


def move_scenario(chunk: int, total: int, hugepage: bool
                  ) -> tuple[int, int, list[str], int, int]:
    """(faults, chunks, errors, source THP bytes before, destination THP bytes after)."""
    src = aligned(total, THP_SIZE)
    dst = aligned(total, THP_SIZE)
    advice = libc.MADV_HUGEPAGE if hugepage else libc.MADV_NOHUGEPAGE
    for area in (src, dst):
        with contextlib.suppress(OSError):  # no THP: the move still works page by page
            libc.madvise(area, total, advice)
    pages = bytes_to_pages(total)
    for i in range(pages):  # the selftest's per-page counters
        ctypes_write(src + pages_to_bytes(i), COUNTER.pack(i + 1))
    src_huge = anon_huge_bytes(src, total)
    uffd = Userfaultfd.new(Feature.MOVE)
    uffd.register(dst, total)
    faults = []

    def handle(event: Event) -> None:
        assert isinstance(event, PageFault) and event.missing and not event.write
        offset = (event.address - dst) // chunk * chunk
        faults.append(offset)
        uffd.move(dst + offset, src + offset, chunk)

    errors: list[str] = []
    with handler_thread(uffd, handle):
        for base in range(0, total, chunk):
            for off in range(base, base + chunk, PAGE_SIZE):
                (count,) = COUNTER.unpack(read_bytes(src + off, 8))
                if count != bytes_to_pages(off) + 1:
                    errors.append(f"source page {bytes_to_pages(off)} holds {count}")
            for off in range(base, base + chunk, PAGE_SIZE):
                (count,) = COUNTER.unpack(read_bytes(dst + off, 8))  # faults, then moves
                if count != bytes_to_pages(off) + 1:
                    errors.append(f"page {bytes_to_pages(off)} holds {count} after the move")
            for off in range(base, base + chunk, PAGE_SIZE):
                if read_bytes(src + off, 8) != bytes(8):
                    errors.append(f"source page {bytes_to_pages(off)} still holds data")
    return len(faults), total // chunk, errors, src_huge, anon_huge_bytes(dst, total)


def ctypes_write(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, data, len(data))


@pytest.mark.timeout(60)
def test_move() -> None:
    require(Feature.MOVE)
    faults, steps, errors, _, _ = run_in_child(
        lambda: move_scenario(PAGE_SIZE, pages_to_bytes(64), hugepage=False))
    assert errors == []
    assert faults == steps


@pytest.mark.timeout(60)
def test_move_pmd() -> None:
    """2 MiB chunks of huge pages: the PMD is moved whole, so the destination holds huge pages.

    The PTE path would split each huge page into small ones first (the destination's
    AnonHugePages would stay 0), so the count after the moves tells which path ran.
    """
    require(Feature.MOVE)
    total = 4 * THP_SIZE
    faults, steps, errors, src_huge, dst_huge = run_in_child(
        lambda: move_scenario(THP_SIZE, total, hugepage=True))
    assert errors == []
    assert faults == steps
    if src_huge == 0:
        pytest.skip("no transparent huge page backs the source (THP off or none free)")
    assert dst_huge == src_huge
