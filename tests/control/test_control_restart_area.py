"""The control area (control/restart_area.py): records survive a write cut short at any byte.

A monitor can be SIGKILLed between any two stores of an area write. The model of a torn write
here: the first ``k`` bytes of the slot being written hold the new record, the rest the old
bytes -- for every ``k``. A successor must then read either the record before the write or the
one it wrote, never fail and never a mix. The first write of all is the case the torture found
(seed 104: an enable's first journal write cut by the kill left slot 1 torn and slot 0 blank,
and the successor refused to resume).
"""

from __future__ import annotations

import struct
import zlib

import pytest

from vmmswap.control.restart_area import (
    AREA_SIZE,
    AreaRecord,
    EnablePhase,
    RestartArea,
    RestartAreaError,
)
from vmmswap.control.status import SwapState

SLOT = AREA_SIZE // 2


def _area(data: bytes | None = None) -> tuple[bytearray, RestartArea]:
    buf = bytearray(AREA_SIZE) if data is None else bytearray(data)
    return buf, RestartArea(memoryview(buf))


def _same(a: AreaRecord, b: AreaRecord) -> bool:
    """Equal but for the write counter (a fresh area's record has none)."""
    return (a.state, a.enable_phase, a.prior_state, a.flags, a.restarts, a.transition_pages,
            a.last_resume_seconds, a.error) == (b.state, b.enable_phase, b.prior_state, b.flags,
                                                b.restarts, b.transition_pages,
                                                b.last_resume_seconds, b.error)


STARTING = AreaRecord(SwapState.READY, EnablePhase.STARTING, SwapState.READY, transition_pages=7)
MOVING = AreaRecord(SwapState.READY, EnablePhase.MOVING, SwapState.READY, restarts=2,
                    transition_pages=4096, last_resume_seconds=0.25, error="nö space")


def test_round_trip_and_sequence() -> None:
    buf, area = _area()
    assert area.blank and _same(area.read(), AreaRecord())
    area.write(STARTING)
    area.write(MOVING)
    got = area.read()
    assert _same(got, MOVING) and got.writes == 2
    # A successor over the same bytes continues the sequence: its write lands in the older
    # slot, so the newest stays intact while it is written.
    successor = RestartArea(memoryview(buf))
    successor.write(AreaRecord(SwapState.PENDING))
    assert successor.read().writes == 3 and successor.read().state is SwapState.PENDING
    assert _same(RestartArea(memoryview(bytearray(buf[:SLOT]) + bytes(SLOT))).read(), MOVING)


def _torn_writes(before: bytes, record: AreaRecord) -> list[tuple[int, bytes]]:
    """Every prefix-torn version of writing ``record`` over ``before``: (k, bytes)."""
    _, done = _area(before)
    done.write(record)
    after = bytes(done._view)
    changed = [i for i in range(AREA_SIZE) if before[i] != after[i]]
    assert changed, "the write changed nothing"
    lo, hi = min(changed), max(changed)
    assert hi - lo < SLOT, "a write touched both slots"
    start = lo - lo % SLOT
    return [(k, after[:start + k] + before[start + k:]) for k in range(SLOT + 1)]


@pytest.mark.parametrize("history", [[], [STARTING], [STARTING, MOVING]],
                         ids=["first-write", "second-write", "third-write"])
def test_a_write_torn_at_any_byte_leaves_the_old_or_the_new_record(
        history: list[AreaRecord]) -> None:
    buf, area = _area()
    for record in history:
        area.write(record)
    old = area.read() if history else AreaRecord()
    new = AreaRecord(SwapState.PENDING, EnablePhase.NONE, SwapState.READY, restarts=1,
                     transition_pages=99, error="x" * 300)
    seen_old = seen_new = 0
    for k, data in _torn_writes(bytes(buf), new):
        got = RestartArea(memoryview(bytearray(data))).read()
        if _same(got, new):
            seen_new += 1
        else:
            assert _same(got, old), f"a write torn after {k} bytes read as {got}"
            seen_old += 1
        # The successor's own next write goes on from there and reads back.
        successor = RestartArea(memoryview(bytearray(data)))
        successor.write(MOVING)
        assert _same(successor.read(), MOVING)
    # Only the complete write (its CRC is the last store) reads as new.
    assert seen_new == 1 and seen_old == SLOT


def test_both_slots_torn_is_refused() -> None:
    buf, area = _area()
    area.write(STARTING)
    area.write(MOVING)
    for slot in (0, 1):
        buf[slot * SLOT + 20] ^= 0xFF
    with pytest.raises(RestartAreaError, match="both slots"):
        area.read()
    # Slot 0 torn and slot 1 blank: not a state one writer leaves either.
    blank_1 = bytearray(buf[:SLOT]) + bytes(SLOT)
    with pytest.raises(RestartAreaError, match="both slots"):
        RestartArea(memoryview(blank_1)).read()


def test_foreign_layouts_are_refused() -> None:
    buf, area = _area()
    area.write(STARTING)
    index = 1  # the first write's slot

    def rewrite(offset: int, fmt: str, value: object) -> RestartArea:
        data = bytearray(buf)
        struct.pack_into(fmt, data, index * SLOT + offset, value)
        crc_at = index * SLOT + SLOT - 4
        struct.pack_into("<I", data, crc_at, zlib.crc32(data[index * SLOT:crc_at]))
        return RestartArea(memoryview(data))

    with pytest.raises(RestartAreaError, match="magic"):
        rewrite(0, "<4s", b"XXXX").read()
    with pytest.raises(RestartAreaError, match="layout 9"):
        rewrite(4, "<H", 9).read()
    with pytest.raises(RestartAreaError, match="does not parse"):
        rewrite(16, "<B", 250).read()
    with pytest.raises(RestartAreaError, match="writable"):
        RestartArea(memoryview(bytes(AREA_SIZE)))


def test_error_text_is_cut_at_a_character_boundary() -> None:
    _, area = _area()
    area.write(AreaRecord(SwapState.FAILED, error="é" * 1000))  # 2000 bytes of UTF-8
    got = area.read().error
    assert got is not None and got == "é" * 512
