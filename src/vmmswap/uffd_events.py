"""userfaultfd events, and the pure parser of raw ``uffd_msg`` bytes.

Parsing is a pure function over bytes so it can be tested without a kernel, and so a reader can
pull many messages with one ``read(2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmswap.kernel.uffd import (
    UFFD_MSG_FORK,
    UFFD_MSG_HEADER,
    UFFD_MSG_PAGEFAULT,
    UFFD_MSG_REMAP,
    UFFD_MSG_REMOVE,
    UFFD_MSG_SIZE,
    EventType,
    PagefaultFlag,
)


@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread is blocked on ``address`` until someone fills or wakes the page."""

    address: int
    flags: PagefaultFlag
    thread_id: int = 0  # filled only with Feature.THREAD_ID

    @property
    def write(self) -> bool:
        return bool(self.flags & PagefaultFlag.WRITE)

    @property
    def wp(self) -> bool:
        return bool(self.flags & PagefaultFlag.WP)

    @property
    def minor(self) -> bool:
        return bool(self.flags & PagefaultFlag.MINOR)

    @property
    def missing(self) -> bool:
        return not self.flags & (PagefaultFlag.WP | PagefaultFlag.MINOR)


@dataclass(frozen=True, slots=True)
class Fork:
    """The monitored process forked (Feature.EVENT_FORK); ``fd`` is the child's new uffd.

    The kernel has already installed ``fd`` in the reader's descriptor table: whoever reads the
    event owns it and must close it.
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
    """``madvise(MADV_REMOVE/DONTNEED)`` dropped ``[start, end)``; it stays registered."""

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


def parse_event(msg: bytes | memoryview) -> Event:
    """Decode one 32-byte ``uffd_msg``."""
    if len(msg) != UFFD_MSG_SIZE:
        raise ValueError(f"a uffd_msg is {UFFD_MSG_SIZE} bytes, got {len(msg)}")
    (code,) = UFFD_MSG_HEADER.unpack_from(msg)
    if code == EventType.PAGEFAULT:
        flags, address, ptid = UFFD_MSG_PAGEFAULT.unpack(msg)
        return PageFault(address, PagefaultFlag(flags), ptid)
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
    view = memoryview(data)
    if len(view) % UFFD_MSG_SIZE:
        raise ValueError(
            f"{len(view)} bytes is not a whole number of {UFFD_MSG_SIZE}-byte messages")
    return [parse_event(view[i:i + UFFD_MSG_SIZE]) for i in range(0, len(view), UFFD_MSG_SIZE)]
