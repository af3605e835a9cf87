"""StagingMemory and the move planner (huge-page-whole batches)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmswap.dataplane import move as move_module
from vmmswap.dataplane.guest_memory import data_ranges
from vmmswap.dataplane.move import MoveRegion, move_to_staging, plan_batches
from vmmswap.dataplane.staging import StagingMemory
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, THP_SIZE

MiB = 1024 * 1024


def test_staging_is_a_named_memfd_that_frees_on_clear() -> None:
    with StagingMemory(64) as s:
        assert "swap staging memory" in os.readlink(f"/proc/self/fd/{s.fileno()}")
        os.pwrite(s.fileno(), b"x" * PAGE_SIZE * 4, 0)
        s.mark_present(0, 4)
        assert s.pages == 4
        buf = bytearray(2 * PAGE_SIZE)
        s.read(1, 3, memoryview(buf))
        assert buf == b"x" * 2 * PAGE_SIZE
        s.clear_range(0, 2)
        s.clear_pages(np.array([3]))
        assert s.pages == 1
        s.flush()  # the memory is freed by a helper thread, in batches
        assert list(data_ranges(s.fileno(), 64 * PAGE_SIZE)) == [(2 * PAGE_SIZE, 3 * PAGE_SIZE)]


def check_plan(extents: list[tuple[int, int]], size: int, batch: int) -> None:
    batches = plan_batches(extents, size, batch)
    copied: list[tuple[int, int]] = []
    prev_end = 0
    for b in batches:
        assert b.remove_start % THP_SIZE == 0
        assert b.remove_end % THP_SIZE == 0 or b.remove_end == size
        assert prev_end <= b.remove_start < b.remove_end <= size  # no overlap, in order
        prev_end = b.remove_end
        for start, end in b.copies:
            assert b.remove_start <= start < end <= b.remove_end
        copied.extend(b.copies)
    # Every data byte is copied exactly once.
    def flat(ranges: list[tuple[int, int]]) -> set[int]:
        return {p for s, e in ranges for p in range(s // PAGE_SIZE, e // PAGE_SIZE)}
    assert flat(copied) == flat(extents)
    assert sum(e - s for s, e in copied) == sum(e - s for s, e in extents)


def test_plan_cuts_only_between_huge_pages() -> None:
    size = 64 * MiB
    # A big unaligned extent, small ones sharing a huge page, one at the region end.
    extents = [(PAGE_SIZE, 9 * MiB + 5 * PAGE_SIZE),
               (9 * MiB + 8 * PAGE_SIZE, 9 * MiB + 9 * PAGE_SIZE),
               (20 * MiB, 20 * MiB + PAGE_SIZE), (size - PAGE_SIZE, size)]
    check_plan(extents, size, 2 * MiB)
    batches = plan_batches(extents, size, 2 * MiB)
    # The two extents in the same huge page end up in one batch.
    holder = [b for b in batches if any(s <= 9 * MiB + 8 * PAGE_SIZE < e for s, e in b.copies)]
    assert any(s <= 9 * MiB < e for s, e in holder[0].copies)


def test_plan_of_an_unaligned_region_end() -> None:
    size = 3 * MiB + 3 * PAGE_SIZE
    batches = plan_batches([(0, size)], size, THP_SIZE)
    assert batches[-1].remove_end == size
    check_plan([(0, size)], size, THP_SIZE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2047), unique=True, max_size=60), st.sampled_from([1, 2, 3, 8]))
def test_plan_property(pages: list[int], batch_thps: int) -> None:
    size = 2048 * PAGE_SIZE + 5 * PAGE_SIZE
    pages.sort()
    extents: list[tuple[int, int]] = []
    for p in pages:
        if extents and extents[-1][1] == p * PAGE_SIZE:
            extents[-1] = (extents[-1][0], (p + 1) * PAGE_SIZE)
        else:
            extents.append((p * PAGE_SIZE, (p + 1) * PAGE_SIZE))
    check_plan(extents, size, batch_thps * THP_SIZE)


def test_plan_rejects_extents_outside_the_region() -> None:
    with pytest.raises(ValueError, match="outside the region"):
        plan_batches([(0, 2 * PAGE_SIZE)], PAGE_SIZE)


def test_move_copies_data_and_punches_guest_memory() -> None:
    size = 8 * MiB
    with Mapping.memfd(size, "guest") as guest, StagingMemory(2 * size // PAGE_SIZE) as staging:
        assert guest.fd is not None
        data = {p: bytes([p % 251 + 1]) * PAGE_SIZE for p in (0, 1, 2, 700, 1500, 2047)}
        for p, d in data.items():
            os.pwrite(guest.fd, d, p * PAGE_SIZE)
        base = size // PAGE_SIZE  # the region's pages start half-way into staging
        moved = move_to_staging([MoveRegion(guest.fd, size, base)], staging, batch_bytes=THP_SIZE)
        assert moved == len(data)
        assert list(data_ranges(guest.fd, size)) == []
        assert staging.pages == len(data)
        for p, d in data.items():
            assert staging.present.get(base + p)
            buf = bytearray(PAGE_SIZE)
            staging.read(base + p, base + p + 1, memoryview(buf))
            assert buf == d


def test_move_failure_keeps_pages_in_the_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 4 * MiB
    with Mapping.memfd(size, "guest") as guest, StagingMemory(size // PAGE_SIZE) as staging:
        assert guest.fd is not None
        os.pwrite(guest.fd, b"a" * (3 * MiB), 0)

        real = os.copy_file_range
        calls = {"n": 0}

        def flaky(*args: int) -> int:
            calls["n"] += 1
            if args[3] >= 2 * MiB:  # the second huge page's batch fails
                raise OSError(28, "No space left on device")
            return real(*args)

        monkeypatch.setattr(os, "copy_file_range", flaky)
        with pytest.raises(OSError, match="No space"):
            move_to_staging([MoveRegion(guest.fd, size, 0)], staging, batch_bytes=THP_SIZE,
                            workers=1)
        # First batch moved, second stayed in the guest; nothing is in both or neither.
        assert staging.pages == 512
        assert list(data_ranges(guest.fd, size)) == [(2 * MiB, 3 * MiB)]
        assert list(data_ranges(staging.fileno(), size)) == [(0, 2 * MiB)]


def test_move_accounts_for_every_batch_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later submit that fails (no thread) must not orphan the batches already running."""
    size = 8 * MiB
    class SecondSubmitFails(ThreadPoolExecutor):
        submits = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            SecondSubmitFails.submits += 1
            if SecondSubmitFails.submits == 2:
                raise RuntimeError("can't start new thread")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(move_module, "ThreadPoolExecutor", SecondSubmitFails)
    with Mapping.memfd(size, "guest") as guest, StagingMemory(size // PAGE_SIZE) as staging:
        assert guest.fd is not None
        os.pwrite(guest.fd, b"g" * size, 0)
        with pytest.raises(RuntimeError, match="new thread"):
            move_to_staging([MoveRegion(guest.fd, size, 0)], staging, batch_bytes=THP_SIZE)
        # Batch one moved, the rest stayed: every page is in exactly one place.
        staged = staging.present.bools(0, size // PAGE_SIZE)
        in_guest = np.zeros(size // PAGE_SIZE, dtype=np.bool_)
        for start, end in data_ranges(guest.fd, size):
            in_guest[start // PAGE_SIZE:end // PAGE_SIZE] = True
        assert staged.sum() == THP_SIZE // PAGE_SIZE
        assert (staged ^ in_guest).all()
