"""A bitmap of pages: which pages a store (staging, the swap file) holds.

crosvm keeps one ``bool`` per page (TODO b/262379173: "switch to a bit vector"). Here it is one
*bit* per page in little-endian 64-bit words, so the whole page state of a 1 GiB guest (262,144
pages) costs 32 KiB per list and a scan for the next run walks 64 pages per word. Single-bit
operations on the fault path stay in Python integers (one ``ndarray.item`` call); scans over many
words go through numpy.

Bit ``i`` of word ``w`` is page ``w * 64 + i``. Page indexes are whatever the owner counts from
(the handler counts all regions back to back, like crosvm's ``base_page_idx_in_file``).
"""

from __future__ import annotations

import itertools
from typing import Final

import numpy as np
import numpy.typing as npt

_WORD_BITS: Final = 64
_WORD_SHIFT: Final = 6
_BIT_MASK: Final = _WORD_BITS - 1
_ALL_ONES: Final = (1 << _WORD_BITS) - 1
#: Words examined one by one in Python before a scan switches to numpy: short runs (the fault
#: path's readahead window is at most 8 words) are cheaper without numpy's per-call overhead.
_PY_SCAN_WORDS: Final = 8
#: First numpy scan chunk, in words; doubles up to _MAX_SCAN_WORDS so a sparse list of a 16 GiB
#: guest is crossed in a few calls while a dense one does not unpack more than it needs.
_MIN_SCAN_WORDS: Final = 64
_MAX_SCAN_WORDS: Final = 1 << 16

Indices = npt.NDArray[np.int64]


def _lowest_bit(word: int) -> int:
    """Index of the lowest set bit of a non-zero word."""
    return (word & -word).bit_length() - 1


class PresentList:
    """One bit per page; ``True`` means the owner holds the page."""

    __slots__ = ("_num_pages", "_words")

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError(f"a present list cannot have {num_pages} pages")
        self._num_pages = num_pages
        # '<u8': bit order inside the bytes is fixed, so views as uint8 unpack the same way on
        # any host.
        self._words: npt.NDArray[np.uint64] = np.zeros(
            (num_pages + _BIT_MASK) >> _WORD_SHIFT, dtype="<u8")

    @classmethod
    def over(cls, words: npt.NDArray[np.uint64], num_pages: int) -> PresentList:
        """A list whose bits live in ``words`` (a view of shared memory, say: the page state
        memfd), which it uses in place and never copies."""
        if words.dtype != np.dtype("<u8") or words.shape != ((num_pages + _BIT_MASK)
                                                             >> _WORD_SHIFT,):
            raise ValueError(f"{num_pages} pages need {(num_pages + _BIT_MASK) >> _WORD_SHIFT} "
                             f"little-endian u64 words, got {words.dtype} {words.shape}")
        self = cls.__new__(cls)
        self._num_pages = num_pages
        self._words = words
        return self

    # --- sizes ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._num_pages

    @property
    def nbytes(self) -> int:
        """Bytes of page state (for the metadata budget)."""
        return int(self._words.nbytes)

    def check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self._num_pages:
            raise IndexError(f"page range [{start}, {end}) is outside [0, {self._num_pages})")

    # --- single pages -----------------------------------------------------------------------------
    def get(self, idx: int) -> bool:
        """Whether page ``idx`` is present."""
        if not 0 <= idx < self._num_pages:
            raise IndexError(f"page {idx} is outside [0, {self._num_pages})")
        return bool(self._words.item(idx >> _WORD_SHIFT) >> (idx & _BIT_MASK) & 1)

    __getitem__ = get

    # --- ranges -----------------------------------------------------------------------------------
    def _apply(self, w: int, mask: int, value: bool) -> None:
        cur = self._words.item(w)
        self._words[w] = (cur | mask) if value else (cur & ~mask & _ALL_ONES)

    def set_range(self, start: int, end: int, value: bool = True) -> None:
        """Mark ``[start, end)`` present (or absent with ``value=False``)."""
        self.check_range(start, end)
        if start == end:
            return
        w0, b0 = start >> _WORD_SHIFT, start & _BIT_MASK
        w1, b1 = end >> _WORD_SHIFT, end & _BIT_MASK
        if w0 == w1:
            self._apply(w0, ((1 << (b1 - b0)) - 1) << b0, value)
            return
        if b0:
            self._apply(w0, _ALL_ONES ^ ((1 << b0) - 1), value)
            w0 += 1
        if w1 > w0:
            self._words[w0:w1] = _ALL_ONES if value else 0
        if b1:
            self._apply(w1, (1 << b1) - 1, value)

    def clear_range(self, start: int, end: int) -> None:
        """Mark ``[start, end)`` absent."""
        self.set_range(start, end, False)

    def set_indices(self, idx: Indices, value: bool = True) -> None:
        """Mark every page in ``idx`` (an integer array) present or absent."""
        if idx.size == 0:
            return
        first, last = int(idx[0]), int(idx[-1])
        if last - first == idx.size - 1 and not (np.diff(idx) != 1).any():
            # One ascending run (swap-out's usual chunk): whole words at a time.
            if first < 0 or last >= self._num_pages:
                raise IndexError(f"page indexes outside [0, {self._num_pages})")
            self.set_range(first, last + 1, value)
            return
        if int(idx.min()) < 0 or int(idx.max()) >= self._num_pages:
            raise IndexError(f"page indexes outside [0, {self._num_pages})")
        words = (idx >> _WORD_SHIFT).astype(np.intp)
        bits = np.left_shift(np.uint64(1), (idx & _BIT_MASK).astype(np.uint64))
        if value:
            np.bitwise_or.at(self._words, words, bits)
        else:
            np.bitwise_and.at(self._words, words, ~bits)

    def test(self, idx: Indices) -> npt.NDArray[np.bool_]:
        """Whether each page of ``idx`` is present."""
        if idx.size == 0:
            return np.zeros(0, dtype=np.bool_)
        words = self._words[(idx >> _WORD_SHIFT).astype(np.intp)]
        return ((words >> (idx & _BIT_MASK).astype(np.uint64)) & np.uint64(1)).astype(np.bool_)

    def bools(self, start: int, end: int) -> npt.NDArray[np.bool_]:
        """The bits of ``[start, end)`` as a bool array (a fresh array)."""
        self.check_range(start, end)
        if start == end:
            return np.zeros(0, dtype=np.bool_)
        w0 = start >> _WORD_SHIFT
        w1 = (end + _BIT_MASK) >> _WORD_SHIFT
        bits = np.unpackbits(self._words[w0:w1].view(np.uint8), bitorder="little")
        off = start - (w0 << _WORD_SHIFT)
        return bits[off:off + end - start].view(np.bool_)

    def count(self, start: int = 0, end: int | None = None) -> int:
        """Present pages in ``[start, end)`` (the whole list by default)."""
        if end is None:
            end = self._num_pages
        self.check_range(start, end)
        if start == 0 and end == self._num_pages:
            return int(np.bitwise_count(self._words).sum())
        return int(np.count_nonzero(self.bools(start, end)))

    # --- scans ------------------------------------------------------------------------------------
    def find(self, start: int, limit: int | None = None, value: bool = True) -> int:
        """The first page in ``[start, limit)`` whose bit equals ``value``, or ``limit``."""
        if limit is None:
            limit = self._num_pages
        self.check_range(min(start, limit), limit)
        if start >= limit:
            return limit
        words = self._words
        flip = 0 if value else _ALL_ONES
        w = start >> _WORD_SHIFT
        last_w = (limit - 1) >> _WORD_SHIFT
        # The first word: ignore bits below ``start``.
        word = (words.item(w) ^ flip) >> (start & _BIT_MASK)
        if word:
            return min(start + _lowest_bit(word), limit)
        w += 1
        stop_py = min(last_w + 1, w + _PY_SCAN_WORDS)
        while w < stop_py:
            word = words.item(w) ^ flip
            if word:
                return min((w << _WORD_SHIFT) + _lowest_bit(word), limit)
            w += 1
        chunk = _MIN_SCAN_WORDS
        skip = 0 if value else _ALL_ONES
        while w <= last_w:
            end_w = min(last_w + 1, w + chunk)
            hits = np.flatnonzero(words[w:end_w] != skip)
            if hits.size:
                hw = w + int(hits[0])
                return min((hw << _WORD_SHIFT) + _lowest_bit(words.item(hw) ^ flip), limit)
            w = end_w
            chunk = min(chunk * 2, _MAX_SCAN_WORDS)
        return limit

    def run_end(self, start: int, limit: int) -> int:
        """The end of the run of present pages starting at ``start`` (at most ``limit``)."""
        return self.find(start, limit, value=False)

    def run_start(self, page: int, low: int) -> int:
        """The start of the run of present pages that ends just before ``page`` (at least
        ``low``): every page in ``[result, page)`` is present."""
        if page <= low:
            return page
        bits = self.bools(low, page)
        gaps = np.flatnonzero(~bits)
        return low + int(gaps[-1]) + 1 if gaps.size else low

    def first_run(self, start: int, limit: int | None = None,
                  max_pages: int | None = None) -> tuple[int, int] | None:
        """The first run of present pages at or after ``start``: ``(first, end)``, or None.

        The run stops at ``limit`` and is at most ``max_pages`` long.
        """
        if limit is None:
            limit = self._num_pages
        first = self.find(start, limit)
        if first >= limit:
            return None
        stop = limit if max_pages is None else min(limit, first + max_pages)
        return first, self.run_end(first, stop)

    def collect(self, start: int, limit: int | None = None, max_count: int = 1024,
                value: bool = True) -> tuple[Indices, int]:
        """Up to ``max_count`` pages in ``[start, limit)`` whose bit equals ``value``.

        Returns the page indexes (ascending) and where a following scan should resume: just
        after the last page returned, or ``limit`` when the range is exhausted.
        """
        if limit is None:
            limit = self._num_pages
        self.check_range(min(start, limit), limit)
        found: list[Indices] = []
        total = 0
        pos = start
        # Bits are unpacked a chunk at a time; a dense list needs few words per max_count.
        chunk_pages = max(_MIN_SCAN_WORDS << _WORD_SHIFT,
                          ((max_count + _BIT_MASK) >> _WORD_SHIFT) << _WORD_SHIFT)
        while pos < limit and total < max_count:
            pos = self.find(pos, limit, value)
            if pos >= limit:
                break
            end = min(limit, pos + chunk_pages)
            bits = self.bools(pos, end)
            hits = np.flatnonzero(bits if value else ~bits).astype(np.int64) + pos
            take = hits[:max_count - total]
            found.append(take)
            total += take.size
            if take.size < hits.size:
                return np.concatenate(found), int(take[-1]) + 1
            pos = end
            chunk_pages = min(chunk_pages * 2, _MAX_SCAN_WORDS << _WORD_SHIFT)
        result = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        if total >= max_count and result.size:
            return result, int(result[-1]) + 1
        return result, limit

    def subtract(self, other: PresentList) -> int:
        """Clear every page that is present in ``other``; returns how many were cleared."""
        if len(other) != self._num_pages:
            raise ValueError(f"cannot subtract a {len(other)}-page list from a "
                             f"{self._num_pages}-page one")
        both = self._words & other._words
        hits = int(np.bitwise_count(both).sum())
        if hits:
            self._words &= ~both
        return hits

    def any(self) -> bool:
        """Whether any page is present."""
        return bool(self._words.any())


def consecutive_runs(values: Indices) -> list[tuple[int, int]]:
    """``(first_position, count)`` stretches of ``values`` that go up by exactly one."""
    if values.size == 0:
        return []
    steps = np.diff(values) != 1
    if not steps.any():  # the common case (one run), without building the break list
        return [(0, int(values.size))]
    breaks = np.flatnonzero(steps) + 1
    bounds = [0, *breaks.tolist(), int(values.size)]
    return [(a, b - a) for a, b in itertools.pairwise(bounds)]


def runs_of(indices: Indices) -> list[tuple[int, int]]:
    """Group ascending page indexes into ``(first, end)`` runs of consecutive pages."""
    if indices.size == 0:
        return []
    steps = np.diff(indices) != 1
    if not steps.any():
        # One run: the common case on the swap-out path, without building the break list.
        return [(int(indices[0]), int(indices[-1]) + 1)]
    breaks = np.flatnonzero(steps) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [indices.size]))
    return [(int(indices[s]), int(indices[e - 1]) + 1) for s, e in zip(starts, ends, strict=True)]
