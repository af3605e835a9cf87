"""Page-fault round trips: a forked peer touches its registered memory, the test serves it."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
from uffd_helpers import (
    Peer,
    make_area,
    read_bytes,
    recv_msg,
    require,
    send_msg,
    serve,
    write_bytes,
)

from vmmswap.kernel.uffd import Feature, PagefaultFlag
from vmmswap.uffd.events import Event, PageFault
from vmmswap.uffd.pagesize import PAGE_SIZE, page_base, pages_to_bytes
from vmmswap.uffd.userfaultfd import Userfaultfd

PAGES = 8


def page_of(value: int) -> bytes:
    return bytes([value]) * PAGE_SIZE


def faulting_peer(kind: str, features: Feature, access: str, pages: int = PAGES,
                  offset: int = 0) -> Peer:
    """A child that registers ``pages`` pages, hands over its uffd, then touches every page."""

    def run(sock: socket.socket) -> None:
        area = make_area(kind, pages)
        uffd = Userfaultfd.new(features)
        uffd.register(area.address, area.length)
        send_msg(sock, (area.address, threading.get_native_id()), [uffd.fileno()])
        uffd.close()  # the test's copy keeps the registration alive
        recv_msg(sock)
        seen = []
        for i in range(pages):
            if access == "read":
                seen.append(read_bytes(area.page(i) + offset, 1)[0])
            else:
                write_bytes(area.page(i) + offset, bytes([0xF0 | i]))
        if access == "write":  # read back what was written, over what the handler filled
            seen = [read_bytes(area.page(i), PAGE_SIZE) for i in range(pages)]  # type: ignore[misc]
        send_msg(sock, seen)

    return Peer(run)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_read_faults_are_served_by_copy(kind: str) -> None:
    require(Feature.MISSING_SHMEM | Feature.THREAD_ID)
    peer = faulting_peer(kind, Feature.MISSING_SHMEM | Feature.THREAD_ID, "read")
    uffd, (base, tid) = peer.recv_uffd()
    faults: list[PageFault] = []

    def handle(u: Userfaultfd, event: Event) -> None:
        assert isinstance(event, PageFault)
        faults.append(event)
        index = (event.address - base) // PAGE_SIZE
        u.copy(event.address, PAGE_SIZE, page_of(index + 1))

    with uffd:
        assert uffd.read_event() is None and uffd.read_events() == []
        peer.send("go")
        seen = serve([uffd], handle, peer)
    peer.check()
    assert seen == [i + 1 for i in range(PAGES)]
    assert [f.address for f in faults] == [base + pages_to_bytes(i) for i in range(PAGES)]
    assert all(f.missing and not f.write and not f.wp and not f.minor for f in faults)
    assert {f.thread_id for f in faults} == {tid}


@pytest.mark.timeout(30)
def test_write_faults_carry_the_write_flag() -> None:
    peer = faulting_peer("anon", Feature(0), "write")
    uffd, _ = peer.recv_uffd()
    faults: list[PageFault] = []

    def handle(u: Userfaultfd, event: Event) -> None:
        assert isinstance(event, PageFault)
        faults.append(event)
        u.copy(event.address, PAGE_SIZE, page_of(0x11))

    with uffd:
        peer.send("go")
        pages = serve([uffd], handle, peer)
    peer.check()
    assert all(f.write and f.flags == PagefaultFlag.WRITE for f in faults)
    assert thread_id_absent(faults)
    for i, page in enumerate(pages):
        assert page == bytes([0xF0 | i]) + page_of(0x11)[1:]


def thread_id_absent(faults: list[PageFault]) -> bool:
    return all(f.thread_id == 0 for f in faults)  # THREAD_ID not enabled


@pytest.mark.timeout(30)
def test_zero_serves_read_faults_and_writes_then_need_no_event() -> None:
    def run(sock: socket.socket) -> None:
        area = make_area("anon", 1)
        uffd = Userfaultfd.new()
        uffd.register(area.address, area.length)
        send_msg(sock, area.address, [uffd.fileno()])
        recv_msg(sock)
        first = read_bytes(area.address, PAGE_SIZE)
        write_bytes(area.address, b"\x01")  # copy-on-write of the zero page: no uffd fault
        send_msg(sock, (first == bytes(PAGE_SIZE), read_bytes(area.address, 2)))

    peer = Peer(run)
    uffd, _ = peer.recv_uffd()
    events: list[Event] = []

    def handle(u: Userfaultfd, event: Event) -> None:
        events.append(event)
        assert isinstance(event, PageFault)
        u.zero(event.address, PAGE_SIZE)

    with uffd:
        peer.send("go")
        zeroed, after = serve([uffd], handle, peer)
    peer.check()
    assert zeroed and after == b"\x01\x00"
    assert len(events) == 1


@pytest.mark.timeout(30)
def test_exact_address() -> None:
    require(Feature.EXACT_ADDRESS)
    peer = faulting_peer("anon", Feature.EXACT_ADDRESS, "read", pages=2, offset=123)
    uffd, (base, _) = peer.recv_uffd()
    addresses: list[int] = []

    def handle(u: Userfaultfd, event: Event) -> None:
        assert isinstance(event, PageFault)
        addresses.append(event.address)
        u.copy(page_base(event.address), PAGE_SIZE, page_of(1))

    with uffd:
        peer.send("go")
        serve([uffd], handle, peer)
    peer.check()
    assert addresses == [base + 123, base + PAGE_SIZE + 123]


@pytest.mark.timeout(30)
def test_fill_without_wake_then_wake() -> None:
    peer = faulting_peer("anon", Feature(0), "read", pages=2)
    uffd, _ = peer.recv_uffd()

    def handle(u: Userfaultfd, event: Event) -> None:
        assert isinstance(event, PageFault)
        u.copy(event.address, PAGE_SIZE, page_of(2), wake=False)
        u.wake(event.address, PAGE_SIZE)

    with uffd:
        peer.send("go")
        assert serve([uffd], handle, peer) == [2, 2]
    peer.check()


@pytest.mark.timeout(30)
def test_blocking_descriptor_read_waits_for_the_fault() -> None:
    def run(sock: socket.socket) -> None:
        area = make_area("anon", 1)
        uffd = Userfaultfd.new(nonblocking=False)
        uffd.register(area.address, area.length)
        send_msg(sock, area.address, [uffd.fileno()])
        uffd.close()
        recv_msg(sock)
        send_msg(sock, read_bytes(area.address, 1))

    peer = Peer(run)
    uffd, base = peer.recv_uffd()
    with uffd:
        peer.send("go")
        events = uffd.read_events()  # blocks, GIL released, until the peer faults
        assert events == [PageFault(base, PagefaultFlag(0), 0)]
        uffd.copy(base, PAGE_SIZE, page_of(9))
        assert peer.recv()[0] == b"\x09"
    peer.check()


@pytest.mark.timeout(30)
def test_two_waiting_threads_are_both_reported() -> None:
    """Two threads wait at once; the batch reader reports both, one COPY wakes both."""

    def run(sock: socket.socket) -> None:
        area = make_area("anon", 2)
        uffd = Userfaultfd.new()
        uffd.register(area.address, area.length)
        send_msg(sock, area.address, [uffd.fileno()])
        uffd.close()
        recv_msg(sock)
        threads = [threading.Thread(target=read_bytes, args=(area.page(i), 1)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        send_msg(sock, [t.is_alive() for t in threads])

    peer = Peer(run)
    uffd, base = peer.recv_uffd()
    with uffd:
        peer.send("go")
        events: list[Event] = []
        deadline = time.monotonic() + 10
        while len(events) < 2 and time.monotonic() < deadline:
            select.select([uffd], [], [], 0.5)
            time.sleep(0.05)  # let the second fault queue up
            events += uffd.read_events()
        assert sorted(e.address for e in events if isinstance(e, PageFault)) == [
            base, base + PAGE_SIZE]
        uffd.copy(base, pages_to_bytes(2), page_of(1) * 2)
        assert peer.recv()[0] == [False, False]
    peer.check()
