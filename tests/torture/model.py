"""The reference model: who owns which page, what each page must hold, and the check.

Memory per page is a numpy slot, never a Python object: ``owner`` (int16) says which actor
may write a page, ``version`` (uint32) what it must hold. The content of (page, version) is a
pure function, so a page served from the wrong place, a stale version or a zero page is
detected word by word. Version 0 is the zero page (never written, or discarded); UNKNOWN means
"not checkable until rewritten" (a device killed in the middle of a write).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.uffd.pagesize import PAGE_SIZE

MIB: Final = 1 << 20
WORDS: Final = PAGE_SIZE // 8
#: Three regions: the first two adjacent in guest-physical space (runs cross from one to the
#: other, and across the 2 MiB and 4 MiB lines inside them), then a gap, then a third.
LAYOUT: Final = ((0, 3 * MIB), (3 * MIB, 2 * MIB), (8 * MIB, 1 * MIB))
#: Guest page indices of the contiguous span [0, 5 MiB) and of the third region.
SHARED: Final = -1
UNKNOWN: Final = np.uint32(0xFFFFFFFF)
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX: Final = np.uint64(0xC2B2AE3D27D4EB4F)
_WORD: Final = np.arange(WORDS, dtype=np.uint64) * np.uint64(0x100000001B3)


def page_indices() -> npt.NDArray[np.int64]:
    """Guest page index (guest address / PAGE_SIZE) of every page, in layout order."""
    return np.concatenate([np.arange(g // PAGE_SIZE, (g + n) // PAGE_SIZE, dtype=np.int64)
                           for g, n in LAYOUT])


def content(gpages: npt.NDArray[np.int64], versions: npt.NDArray[np.uint32]) -> np.ndarray:
    """(len, WORDS) uint64: what guest pages ``gpages`` hold at ``versions`` (0: zeros)."""
    key = (gpages.astype(np.uint64) * _GOLDEN) ^ (versions.astype(np.uint64) * _MIX)
    out: np.ndarray = key[:, None] ^ _WORD[None, :]
    out[versions == 0] = 0
    return out


@dataclass
class Mismatch:
    """One page that did not hold what the model says."""

    gpage: int
    expected_version: int
    expected_word0: int
    read_word0: int
    read_zero: bool

    def describe(self) -> str:
        what = "a zero page" if self.read_zero else f"word0 {self.read_word0:#018x}"
        return (f"guest page {self.gpage:#x} (addr {self.gpage * PAGE_SIZE:#x}): expected "
                f"version {self.expected_version} (word0 {self.expected_word0:#018x}), "
                f"read {what}")


def check(data: bytes, gpages: npt.NDArray[np.int64], versions: npt.NDArray[np.uint32],
          mask: npt.NDArray[np.bool_]) -> Mismatch | None:
    """Compare ``data`` (the pages ``gpages``) with the model where ``mask`` is set."""
    if not mask.any():
        return None
    got = np.frombuffer(data, dtype=np.uint64).reshape(-1, WORDS)[mask]
    want = content(gpages[mask], versions[mask])
    bad = np.flatnonzero(np.any(got != want, axis=1))
    if bad.size == 0:
        return None
    i = int(bad[0])
    return Mismatch(int(gpages[mask][i]), int(versions[mask][i]), int(want[i, 0]),
                    int(got[i, 0]), bool(not got[i].any()))


class Ownership:
    """Pages in blocks of random length, each block owned by one actor.

    Owners: ``SHARED`` (written once before the run, read by everyone, never written again),
    0..workers-1 (worker threads), ``workers``..``workers+devices-1`` (device slots). Shared
    blocks are randomly version 0 (never written) or 1.
    """

    def __init__(self, rng: random.Random, workers: int, devices: int) -> None:
        self.gpages = page_indices()
        n = self.gpages.size
        self.owner = np.empty(n, dtype=np.int16)
        self.initial = np.zeros(n, dtype=np.uint32)
        pos = 0
        while pos < n:
            length = min(n - pos, rng.choice((1, 2, 3, 8, 16, 31, 64, 96)))
            who = rng.randrange(-1, workers + devices)
            self.owner[pos:pos + length] = who
            if who == SHARED:
                self.initial[pos:pos + length] = rng.choice((0, 1))
            pos += length

    def index_of(self, guest_addr: int) -> int:
        """Index into the arrays of the page at ``guest_addr``."""
        base = 0
        for g, size in LAYOUT:
            if g <= guest_addr < g + size:
                return base + (guest_addr - g) // PAGE_SIZE
            base += size // PAGE_SIZE
        raise ValueError(f"{guest_addr:#x} is in no region")


def region_spans(first: int, count: int) -> list[tuple[int, int]]:
    """Split array indices [first, first+count) into per-region (first, count) pieces."""
    spans = []
    base = 0
    for _, size in LAYOUT:
        pages = size // PAGE_SIZE
        lo, hi = max(first, base), min(first + count, base + pages)
        if lo < hi:
            spans.append((lo, hi - lo))
        base += pages
    return spans
