"""The pure parser of raw ``uffd_msg`` bytes (no kernel needed)."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmswap.kernel.uffd import PagefaultFlag
from vmmswap.uffd.events import (
    Fork,
    PageFault,
    Remap,
    Remove,
    UnknownEvent,
    Unmap,
    page_fault_from_fields,
    parse_event,
    parse_events,
)

MSG = struct.Struct("=B7xQQQ")
u64 = st.integers(0, 2**64 - 1)


def pagefault(flags: int, address: int, ptid: int = 0) -> bytes:
    return struct.pack("=B7xQQI4x", 0x12, flags, address, ptid)


def test_missing_read_fault() -> None:
    event = parse_event(pagefault(0, 0x7F00_0000_1000))
    assert event == PageFault(0x7F00_0000_1000, PagefaultFlag(0), 0)
    assert isinstance(event, PageFault)
    assert (event.missing, event.write, event.wp, event.minor) == (True, False, False, False)


def test_write_wp_and_minor_faults() -> None:
    write = parse_event(pagefault(1, 0x1000))
    assert isinstance(write, PageFault)
    assert write.write and write.missing
    wp = parse_event(pagefault(3, 0x2000))
    assert isinstance(wp, PageFault)
    assert wp.write and wp.wp and not wp.missing
    minor = parse_event(pagefault(4, 0x3000))
    assert isinstance(minor, PageFault)
    assert minor.minor and not minor.missing and not minor.write


def test_thread_id_is_the_u32_at_offset_24() -> None:
    event = parse_event(pagefault(0, 0x1000, 123456))
    assert isinstance(event, PageFault)
    assert event.thread_id == 123456


def test_unknown_pagefault_flags_are_kept() -> None:
    event = parse_event(pagefault(0x21, 0x1000))
    assert isinstance(event, PageFault)
    assert int(event.flags) == 0x21
    assert event.write


def test_non_cooperative_events() -> None:
    assert parse_event(MSG.pack(0x13, 7, 0, 0)) == Fork(7)
    assert parse_event(MSG.pack(0x14, 0x1000, 0x9000, 0x3000)) == Remap(0x1000, 0x9000, 0x3000)
    assert parse_event(MSG.pack(0x15, 0x1000, 0x5000, 0)) == Remove(0x1000, 0x5000)
    assert parse_event(MSG.pack(0x16, 0x1000, 0x5000, 0)) == Unmap(0x1000, 0x5000)


def test_remove_and_unmap_are_different_events() -> None:
    remove: object = Remove(1, 2)
    assert remove != Unmap(1, 2)


def test_unknown_event_keeps_the_raw_message() -> None:
    raw = MSG.pack(0x42, 1, 2, 3)
    assert parse_event(raw) == UnknownEvent(0x42, raw)


def test_several_messages_from_one_read() -> None:
    data = pagefault(0, 0x1000) + MSG.pack(0x15, 0x2000, 0x3000, 0) + pagefault(1, 0x4000)
    events = parse_events(data)
    assert [type(e) for e in events] == [PageFault, Remove, PageFault]
    assert parse_events(bytearray(data)) == events
    assert parse_events(memoryview(data)) == events
    assert parse_events(b"") == []


def test_a_memoryview_of_another_format_is_read_as_bytes() -> None:
    data = pagefault(0, 0x1000) * 2
    assert parse_events(memoryview(data).cast("Q")) == parse_events(data)


@pytest.mark.parametrize("size", [1, 31, 33, 63])
def test_partial_messages_are_rejected(size: int) -> None:
    with pytest.raises(ValueError, match="32"):
        parse_events(bytes(size))
    with pytest.raises(ValueError, match="32"):
        parse_event(bytes(size))


def test_events_are_frozen_values() -> None:
    event = parse_event(pagefault(0, 0x1000))
    assert isinstance(event, PageFault)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.address = 0  # type: ignore[misc]
    assert hash(event) == hash(PageFault(0x1000, PagefaultFlag(0)))
    assert dataclasses.asdict(event) == {"address": 0x1000, "flags": 0, "thread_id": 0}


@given(flags=st.integers(0, 2**64 - 1), address=u64, ptid=st.integers(0, 2**32 - 1))
def test_pagefault_round_trip(flags: int, address: int, ptid: int) -> None:
    event = parse_event(pagefault(flags, address, ptid))
    assert event == PageFault(address, PagefaultFlag(flags), ptid)
    assert page_fault_from_fields(flags, address, ptid) == event


@given(code=st.integers(0x12, 0x16), a=u64, b=u64, c=u64)
def test_every_known_code_parses(code: int, a: int, b: int, c: int) -> None:
    event = parse_event(MSG.pack(code, a, b, c))
    assert not isinstance(event, UnknownEvent)
