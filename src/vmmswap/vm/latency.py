"""The guest's latency histograms: bucket arithmetic and percentiles.

The guest times the first touch of every page with the TSC and counts the cycle deltas in
log-linear buckets (exact below 8 cycles, then 8 buckets per power of two, so any value is known
within 12.5 %). Only the non-empty buckets cross the port-I/O channel. This module is the host's
half: decoding buckets back to cycles and converting cycles to time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmmswap.vm.guest_abi import HIST_BUCKETS

_SUB_BUCKETS = 8


def bucket_of(cycles: int) -> int:
    """The bucket the guest puts ``cycles`` in (mirror of ``bucket()`` in workload.c)."""
    if cycles < _SUB_BUCKETS:
        return cycles
    exp = cycles.bit_length() - 1
    idx = (exp - 2) * _SUB_BUCKETS + ((cycles >> (exp - 3)) & (_SUB_BUCKETS - 1))
    return min(idx, HIST_BUCKETS - 1)


def bucket_bounds(idx: int) -> tuple[int, int]:
    """``[low, high)`` cycles covered by bucket ``idx``."""
    if idx < _SUB_BUCKETS:
        return idx, idx + 1
    exp = idx // _SUB_BUCKETS + 2
    sub = idx % _SUB_BUCKETS
    shift = exp - 3
    return (_SUB_BUCKETS + sub) << shift, (_SUB_BUCKETS + sub + 1) << shift


def _midpoints() -> npt.NDArray[np.float64]:
    mids = np.empty(HIST_BUCKETS, dtype=np.float64)
    for i in range(HIST_BUCKETS):
        low, high = bucket_bounds(i)
        mids[i] = (low + high - 1) / 2
    return mids


_MIDPOINTS = _midpoints()


@dataclass
class LatencyHistogram:
    """Per-page first-touch latencies, in TSC cycles, as bucket counts."""

    tsc_khz: int
    counts: npt.NDArray[np.uint64] = field(
        default_factory=lambda: np.zeros(HIST_BUCKETS, dtype=np.uint64))

    def add_bucket(self, idx: int, count: int) -> None:
        if not 0 <= idx < HIST_BUCKETS:
            raise ValueError(f"histogram bucket {idx} out of range")
        self.counts[idx] += np.uint64(count)

    def merge(self, other: LatencyHistogram) -> None:
        self.counts += other.counts

    @property
    def samples(self) -> int:
        return int(self.counts.sum())

    def percentile_cycles(self, pct: float) -> float:
        """The cycles at percentile ``pct`` (0-100), as the midpoint of its bucket."""
        total = self.samples
        if total == 0:
            return float("nan")
        rank = max(1, int(np.ceil(total * pct / 100.0)))
        idx = int(np.searchsorted(np.cumsum(self.counts), rank))
        return float(_MIDPOINTS[min(idx, HIST_BUCKETS - 1)])

    def percentile_us(self, pct: float) -> float:
        return self.cycles_to_us(self.percentile_cycles(pct))

    def mean_us(self) -> float:
        total = self.samples
        if total == 0:
            return float("nan")
        return self.cycles_to_us(float((self.counts * _MIDPOINTS).sum() / total))

    def count_above_us(self, micros: float) -> int:
        """Samples whose bucket lies entirely above ``micros`` (e.g. "pages that faulted")."""
        threshold = micros * self.tsc_khz / 1000.0
        lows = np.array([bucket_bounds(i)[0] for i in range(HIST_BUCKETS)], dtype=np.float64)
        return int(self.counts[lows >= threshold].sum())

    def cycles_to_us(self, cycles: float) -> float:
        return cycles * 1000.0 / self.tsc_khz
