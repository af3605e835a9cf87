"""Preparing staging before the freeze (dataplane/move_prepare.py) changes no page's place.

The guest keeps running between ``prepare_move`` and the move: pages it writes, touches for the
first time or discards meanwhile must all come out right, and staging pages prepared for pages
that did not move must be freed again (checked through the staging memfd's data extents, with a
control showing the check sees leftovers when they are there).
"""

from __future__ import annotations

import numpy as np
import pytest

from dataplane.conftest import Rig, RigFactory
from vmmswap.dataplane import move_prepare
from vmmswap.dataplane.guest_memory import data_ranges
from vmmswap.uffd.pagesize import PAGE_SIZE

pytestmark = pytest.mark.timeout(120)
P = PAGE_SIZE


def _leftovers(rig: Rig) -> list[int]:
    """Staging pages that hold memory but whose bit is clear (after pending punches)."""
    staging = rig.handler.staging
    staging.flush()
    held: list[int] = []
    for start, end in data_ranges(staging.fileno(), staging.num_pages * P):
        held.extend(range(start // P, (end + P - 1) // P))
    pages = np.array(held, dtype=np.int64)
    if not pages.size:
        return []
    return [int(p) for p in pages[~staging.present.test(pages)]]


def test_prepared_move_with_the_guest_running_meanwhile(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 128 * P)])
    rig.write(rig.addr(0, 0), seed=1, pages=64)
    prepared = rig.handler.prepare_move()
    assert prepared.resident_pages == 64
    assert prepared.prepared_pages == 64
    assert prepared.limited is None
    # The guest runs on: rewrites a prepared page, touches new pages, discards prepared ones.
    rig.write(rig.addr(0, 3), seed=9, pages=1)
    rig.write(rig.addr(0, 80), seed=2, pages=16)
    rig.remove(rig.addr(0, 10), 3 * P)
    moved = rig.enable()
    assert moved == 64 - 3 + 16
    assert _leftovers(rig) == []  # the three discarded pages' prepared copies are freed
    # Every page from staging, then through a whole out / swap-in cycle.
    for check in ("staging", "file"):
        rig.check(rig.addr(0, 0), 1, 3)
        rig.check(rig.addr(0, 3), 9, 1)
        assert rig.digests(rig.addr(0, 4), 6) == rig.expected(1, 10)[4:]
        assert rig.read(rig.addr(0, 10), 3 * P) == bytes(3 * P)
        assert rig.digests(rig.addr(0, 13), 51) == rig.expected(1, 64)[13:]
        rig.check(rig.addr(0, 80), 2, 16)
        if check == "staging":
            rig.swap_in_all()
            rig.enable()
            rig.out_all()
            assert rig.handler.staging_pages == 0


def test_control_prepared_pages_without_a_move_are_leftovers(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 32 * P)])
    rig.write(rig.addr(0, 0), seed=4, pages=32)
    rig.handler.prepare_move()
    # The check sees what preparing allocated...
    assert _leftovers(rig) == list(range(32))
    # ... and releasing (an enable whose freeze failed) frees it; nothing moved.
    rig.handler.release_prepared()
    assert _leftovers(rig) == []
    assert rig.handler.staging_pages == 0
    assert rig.digests_quietly(rig.addr(0, 0), 32) == rig.expected(4, 32)


def test_prepare_within_a_budget(make_rig: RigFactory) -> None:
    rig = make_rig([(0, 64 * P)])
    rig.write(rig.addr(0, 0), seed=5, pages=64)
    prepared = rig.handler.prepare_move(budget=8 * P)
    assert (prepared.resident_pages, prepared.prepared_pages) == (64, 8)
    assert prepared.limited is not None and "budget" in prepared.limited
    assert rig.enable() == 64
    assert _leftovers(rig) == []
    rig.check(rig.addr(0, 0), 5, 64)


def test_faults_served_between_preparation_steps(make_rig: RigFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``between`` runs after every step; what it does meanwhile (here: the guest faults pages
    back from staging, which frees their staging pages) leaves the move right."""
    rig = make_rig([(0, 64 * P)])
    rig.write(rig.addr(0, 0), seed=6, pages=64)
    rig.enable()
    rig.check(rig.addr(0, 0), 6, 32)  # pages 0-31 back in the guest, 32-63 still staged
    monkeypatch.setattr(move_prepare, "_STEP_PAGES", 8)
    steps: list[int] = []

    def between() -> None:
        if not steps:  # while preparing: the guest touches a staged page, and writes one
            assert rig.digests(rig.addr(0, 40), 1) == rig.expected(6, 41)[40:]
            rig.write(rig.addr(0, 2), seed=7, pages=1)
        steps.append(1)

    prepared = rig.handler.prepare_move(between=between)
    assert prepared.prepared_pages == 32 and len(steps) == 4
    assert rig.enable() == 33
    assert _leftovers(rig) == []
    assert rig.digests(rig.addr(0, 0), 2) == rig.expected(6, 2)
    rig.check(rig.addr(0, 2), 7, 1)
    assert rig.digests(rig.addr(0, 3), 61) == rig.expected(6, 64)[3:]

