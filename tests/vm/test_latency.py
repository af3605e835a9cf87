"""Latency histogram buckets (the guest's log-linear scheme) and percentiles."""

from __future__ import annotations

import math

import pytest

from vmmswap.vm.guest_abi import HIST_BUCKETS
from vmmswap.vm.latency import LatencyHistogram, bucket_bounds, bucket_of


@pytest.mark.parametrize("cycles", [0, 1, 7, 8, 15, 16, 100, 4095, 4096, 123456789, 1 << 50])
def test_bucket_contains_value(cycles: int) -> None:
    low, high = bucket_bounds(bucket_of(cycles))
    assert low <= cycles < high or bucket_of(cycles) == HIST_BUCKETS - 1


def test_buckets_are_contiguous() -> None:
    for idx in range(HIST_BUCKETS - 1):
        assert bucket_bounds(idx)[1] == bucket_bounds(idx + 1)[0]


def test_relative_precision() -> None:
    for idx in range(8, 300):
        low, high = bucket_bounds(idx)
        assert (high - low) / low <= 0.125


def test_percentiles() -> None:
    hist = LatencyHistogram(tsc_khz=1_000_000)  # 1 GHz: 1000 cycles per microsecond
    hist.add_bucket(bucket_of(1000), 99)
    hist.add_bucket(bucket_of(100_000), 1)
    assert hist.samples == 100
    assert hist.percentile_us(50) == pytest.approx(1.0, rel=0.13)
    assert hist.percentile_us(99) == pytest.approx(1.0, rel=0.13)
    assert hist.percentile_us(100) == pytest.approx(100.0, rel=0.13)
    assert hist.count_above_us(10) == 1


def test_empty_histogram() -> None:
    assert math.isnan(LatencyHistogram(tsc_khz=1000).percentile_us(50))


def test_bad_bucket_rejected() -> None:
    with pytest.raises(ValueError):
        LatencyHistogram(tsc_khz=1000).add_bucket(HIST_BUCKETS, 1)
