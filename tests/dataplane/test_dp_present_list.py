"""PresentList: the page bitmap, checked against a plain Python set."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmswap.dataplane.present_list import PresentList, consecutive_runs, runs_of


def test_empty_list_has_nothing() -> None:
    pl = PresentList(1000)
    assert pl.count() == 0
    assert not pl.any()
    assert pl.first_run(0) is None
    assert pl.find(0) == 1000
    assert pl.nbytes == 16 * 8  # 1000 bits round up to 16 words


def test_set_and_clear_ranges_across_words() -> None:
    pl = PresentList(300)
    pl.set_range(3, 200)
    assert pl.count() == 197
    assert not pl.get(2) and pl.get(3) and pl.get(199) and not pl.get(200)
    pl.clear_range(60, 70)
    assert pl.first_run(0) == (3, 60)
    assert pl.first_run(60) == (70, 200)
    assert pl.first_run(70, max_pages=5) == (70, 75)
    assert pl.first_run(0, limit=50) == (3, 50)
    assert pl.count(50, 100) == 40


def test_out_of_range_is_rejected() -> None:
    pl = PresentList(10)
    with pytest.raises(IndexError):
        pl.get(10)
    with pytest.raises(IndexError):
        pl.set_range(5, 11)
    with pytest.raises(IndexError):
        pl.set_indices(np.array([3, 10]))
    assert pl.count() == 0


def test_collect_resumes_after_the_last_page() -> None:
    pl = PresentList(10_000)
    pl.set_indices(np.arange(0, 10_000, 3))
    got, cursor = pl.collect(0, None, 100)
    assert got.tolist() == list(range(0, 300, 3))
    assert cursor == 298
    rest, cursor = pl.collect(cursor, None, 10_000)
    assert rest[0] == 300 and cursor == 10_000
    assert len(got) + len(rest) == pl.count()


def test_collect_clear_bits() -> None:
    pl = PresentList(200)
    pl.set_range(0, 150)
    got, _ = pl.collect(0, 200, 10, value=False)
    assert got.tolist() == list(range(150, 160))


def test_sparse_scan_of_a_big_list() -> None:
    pl = PresentList(4 << 20)  # a 16 GiB guest
    pl.set_range(4_000_000, 4_000_010)
    assert pl.first_run(0) == (4_000_000, 4_000_010)
    assert pl.count() == 10


def test_subtract() -> None:
    a, b = PresentList(100), PresentList(100)
    a.set_range(0, 50)
    b.set_range(40, 60)
    assert a.subtract(b) == 10
    assert a.count() == 40 and b.count() == 20


def test_runs_helpers() -> None:
    assert runs_of(np.array([1, 2, 3, 7, 9, 10])) == [(1, 4), (7, 8), (9, 11)]
    assert consecutive_runs(np.array([5, 6, 2, 3, 4])) == [(0, 2), (2, 3)]
    assert runs_of(np.zeros(0, dtype=np.int64)) == []
    # One run (the fast path), and the look-alikes that span as many pages as they hold.
    assert runs_of(np.arange(60, 130)) == [(60, 130)]
    assert runs_of(np.array([4])) == [(4, 5)]
    assert runs_of(np.array([0, 2, 2])) == [(0, 1), (2, 3), (2, 3)]
    assert consecutive_runs(np.arange(8, 20)) == [(0, 12)]
    assert consecutive_runs(np.array([0, 2, 1, 3])) == [(0, 1), (1, 1), (2, 1), (3, 1)]


ops = st.lists(st.tuples(st.sampled_from(["set", "clear", "idx_set", "idx_clear"]),
                         st.integers(0, 700), st.integers(0, 140),
                         st.sampled_from(["strided", "run", "shuffled"])), max_size=30)


def _indices(start: int, end: int, order: str) -> npt.NDArray[np.int64]:
    """Index arrays for set_indices: strided (never one run), one ascending run (its fast
    path), or that run shuffled (it spans as many pages as it holds, out of order)."""
    if order == "strided":
        return np.arange(start, end, 7, dtype=np.int64)
    idx = np.arange(start, end, dtype=np.int64)
    if order == "shuffled":
        np.random.default_rng(start * 1000 + end).shuffle(idx)
    return idx


@settings(max_examples=150, deadline=None)
@given(ops=ops, probe=st.integers(0, 700))
def test_matches_a_set(ops: list[tuple[str, int, int, str]], probe: int) -> None:
    n = 700
    pl = PresentList(n)
    ref: set[int] = set()
    for op, start, length, order in ops:
        end = min(n, start + length)
        if op == "set":
            pl.set_range(start, end)
            ref |= set(range(start, end))
        elif op == "clear":
            pl.clear_range(start, end)
            ref -= set(range(start, end))
        else:
            idx = _indices(start, end, order)
            pl.set_indices(idx, op == "idx_set")
            if op == "idx_set":
                ref |= set(idx.tolist())
            else:
                ref -= set(idx.tolist())
    assert pl.count() == len(ref)
    assert [i for i in range(n) if pl.get(i)] == sorted(ref)
    nxt = min((i for i in ref if i >= probe), default=n)
    assert pl.find(probe) == nxt
    nxt_clear = min((i for i in range(probe, n) if i not in ref), default=n)
    assert pl.find(probe, value=False) == nxt_clear
    got, _ = pl.collect(probe, None, 50)
    assert got.tolist() == sorted(i for i in ref if i >= probe)[:50]
    assert pl.bools(0, n).nonzero()[0].tolist() == sorted(ref)
