"""userfaultfd events, and the pure parser of raw ``uffd_msg`` bytes.

Parsing is a pure function over bytes so it can be tested without a kernel, and so a reader can
pull many messages with one ``read(2)``. It sits on every fault's path, so page faults take a
fast lane: one ``Struct.unpack`` and a constructor that skips the frozen dataclass ``__init__``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from vmmswap.kernel.uffd import (
    UFFD_MSG_FORK,
    UFFD_MSG_PAGEFAULT,
    UFFD_MSG_REMAP,
    UFFD_MSG_REMOVE,
    UFFD_MSG_SIZE,
    EventType,
    PagefaultFlag,
)


@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread is blocked on ``address`` until someone fills or wakes the page.

    ``address`` is the page's base address unless the descriptor enabled
    ``Feature.EXACT_ADDRESS``. ``thread_id`` is the faulting thread's id with
    ``Feature.THREAD_ID``, 0 otherwise.
    """

    address: int
    flags: PagefaultFlag
    thread_id: int = 0

    @property
    def write(self) -> bool:
        """The access was a write (a read of a missing page may be served with a zero page)."""
        return bool(self.flags & PagefaultFlag.WRITE)

    @property
    def wp(self) -> bool:
        """A write to a write-protected page (RegisterMode.WP)."""
        return bool(self.flags & PagefaultFlag.WP)

    @property
    def minor(self) -> bool:
        """The page is in the page cache but not mapped (RegisterMode.MINOR)."""
        return bool(self.flags & PagefaultFlag.MINOR)

    @property
    def missing(self) -> bool:
        """No page at all (RegisterMode.MISSING): neither a WP nor a MINOR fault."""
        return not self.flags & (PagefaultFlag.WP | PagefaultFlag.MINOR)


@dataclass(frozen=True, slots=True)
class Fork:
    """The monitored process forked (Feature.EVENT_FORK); ``fd`` is the child's new uffd.

    The kernel has already installed ``fd`` in the reader's descriptor table: whoever reads the
    event owns it and must close it. ``Userfaultfd.read_events`` hands it over wrapped, as a
    ``ForkedUffd``.
    """

    fd: int


@dataclass(frozen=True, slots=True)
class Remap:
    """``mremap`` moved ``length`` bytes from ``from_addr`` to ``to_addr``."""

    from_addr: int
    to_addr: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """``madvise(MADV_REMOVE / DONTNEED / FREE)`` on ``[start, end)``; it stays registered.

    The event does not say which advice it was. Only MADV_REMOVE (and DONTNEED/FREE on private
    memory) really drops data; on a shared mapping DONTNEED and FREE keep it in the file.
    """

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """``[start, end)`` was unmapped: forget it, never fill it."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event code this module does not know; the raw message is kept."""

    code: int
    raw: bytes


Event = PageFault | Fork | Remap | Remove | Unmap | UnknownEvent

# --- the fast lane for page faults -------------------------------------------------------------
# Frozen dataclasses forbid attribute assignment; their slot descriptors set the fields directly,
# which is what the generated __init__ does through object.__setattr__, at half the cost.
# ``Userfaultfd.read_events`` inlines the same steps.
_PAGEFAULT: Final = int(EventType.PAGEFAULT)
_unpack_pagefault: Final = UFFD_MSG_PAGEFAULT.unpack
_new: Final = object.__new__
_set_address: Final = vars(PageFault)["address"].__set__
_set_flags: Final = vars(PageFault)["flags"].__set__
_set_thread_id: Final = vars(PageFault)["thread_id"].__set__


class _FlagTable(dict[int, PagefaultFlag]):
    """Flag values to PagefaultFlag, filled as they are seen: one dict lookup per fault."""

    def __missing__(self, value: int) -> PagefaultFlag:
        flag = self[value] = PagefaultFlag(value)
        return flag


_FLAGS: Final = _FlagTable({v: PagefaultFlag(v) for v in range(8)})


def page_fault_from_fields(flags: int, address: int, thread_id: int) -> PageFault:
    """A :class:`PageFault` from the message's raw fields, in message order."""
    event: PageFault = _new(PageFault)
    _set_address(event, address)
    _set_flags(event, _FLAGS[flags])
    _set_thread_id(event, thread_id)
    return event


def parse_event(msg: bytes | bytearray | memoryview) -> Event:
    """Decode one 32-byte ``uffd_msg``."""
    if len(msg) != UFFD_MSG_SIZE:
        raise ValueError(f"a uffd_msg is {UFFD_MSG_SIZE} bytes, got {len(msg)}")
    code = msg[0]
    if code == _PAGEFAULT:
        return page_fault_from_fields(*_unpack_pagefault(msg))
    if code == EventType.REMOVE:
        start, end = UFFD_MSG_REMOVE.unpack(msg)
        return Remove(start, end)
    if code == EventType.UNMAP:
        start, end = UFFD_MSG_REMOVE.unpack(msg)
        return Unmap(start, end)
    if code == EventType.REMAP:
        from_addr, to_addr, length = UFFD_MSG_REMAP.unpack(msg)
        return Remap(from_addr, to_addr, length)
    if code == EventType.FORK:
        (fd,) = UFFD_MSG_FORK.unpack(msg)
        return Fork(fd)
    return UnknownEvent(code, bytes(msg))


def parse_events(data: bytes | bytearray | memoryview) -> list[Event]:
    """Decode the whole messages a ``read(2)`` on a uffd returned."""
    if isinstance(data, memoryview):
        data = data.cast("B")
    size = len(data)
    if size == UFFD_MSG_SIZE:
        return [parse_event(data)]
    if size % UFFD_MSG_SIZE:
        raise ValueError(
            f"{size} bytes is not a whole number of {UFFD_MSG_SIZE}-byte messages")
    view = memoryview(data)
    return [parse_event(view[i:i + UFFD_MSG_SIZE]) for i in range(0, size, UFFD_MSG_SIZE)]
