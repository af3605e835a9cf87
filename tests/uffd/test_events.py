"""Non-cooperative events (selftest ``events``): fork, remap, remove, and unmap.

As in the selftest, the registered process forks a child that does the faulting; the monitor
(this test process) switches to the child's uffd from the FORK event, follows its REMAP, and
unregisters on REMOVE; then the child checks that released memory reads as zeros.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
from uffd_helpers import (
    Peer,
    keep_alive,
    make_area,
    read_bytes,
    recv_msg,
    require,
    send_msg,
    serve,
)

from vmmswap.kernel import libc
from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.events import Event, PageFault, Remap, Remove, Unmap
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, pages_to_bytes
from vmmswap.uffd.userfaultfd import ForkedUffd, Userfaultfd

PAGES = 16
EVENTS = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.MISSING_SHMEM


def page_value(index: int) -> int:
    return (index % 250) + 1


def run_child_and_report(sock: socket.socket, child: Callable[[], int]) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    send_msg(sock, os.waitstatus_to_exitcode(status))


def events_peer(kind: str) -> Peer:
    def run(sock: socket.socket) -> None:
        area = make_area(kind, PAGES)
        target = keep_alive(Mapping.reserve(area.length))  # where the child mremaps the area
        uffd = Userfaultfd.new(EVENTS)
        uffd.register(area.address, area.length)
        send_msg(sock, (area.address, target.address), [uffd.fileno()])
        recv_msg(sock)

        def faulting_process() -> int:
            half = PAGES // 2
            for i in range(half):
                if read_bytes(area.page(i), 1)[0] != page_value(i):
                    return 2
            moved = libc.mremap(area.address, area.length, area.length,
                                libc.MREMAP_MAYMOVE | libc.MREMAP_FIXED, target.address)
            for i in range(half, PAGES):
                if read_bytes(moved + pages_to_bytes(i), 1)[0] != page_value(i):
                    return 3
            advice = libc.MADV_REMOVE if kind == "shmem" else libc.MADV_DONTNEED
            libc.madvise(moved, area.length, advice)  # REMOVE: the monitor unregisters
            if read_bytes(moved, area.length) != bytes(area.length):
                return 4
            return 0

        run_child_and_report(sock, faulting_process)

    return Peer(run)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_events(kind: str) -> None:
    require(EVENTS)
    peer = events_peer(kind)
    uffd, (base, target) = peer.recv_uffd(EVENTS)
    uffds = [uffd]
    bases = {uffd.fileno(): base}
    seen: list[str] = []
    missing = 0

    def handle(u: Userfaultfd, event: Event) -> None:
        nonlocal missing
        if isinstance(event, ForkedUffd):
            seen.append("fork")
            assert event.uffd.features == EVENTS
            uffds.append(event.uffd)
            bases[event.uffd.fileno()] = bases[u.fileno()]
        elif isinstance(event, PageFault):
            assert event.missing and not event.write
            missing += 1
            index = (event.address - bases[u.fileno()]) // PAGE_SIZE
            u.copy(event.address, PAGE_SIZE, bytes([page_value(index)]) * PAGE_SIZE)
        elif isinstance(event, Remap):
            seen.append("remap")
            assert (event.from_addr, event.to_addr) == (bases[u.fileno()], target)
            assert event.length == pages_to_bytes(PAGES)
            bases[u.fileno()] = event.to_addr
        elif isinstance(event, Remove):
            seen.append("remove")
            assert (event.start, event.end) == (target, target + pages_to_bytes(PAGES))
            u.unregister(event.start, event.end - event.start)
        else:
            raise AssertionError(f"unexpected {event}")

    peer.send("go")
    child_status = serve(uffds, handle, peer)
    peer.check()
    for u in uffds:
        u.close()
    assert child_status == 0, f"the faulting child failed with {child_status}"
    assert seen == ["fork", "remap", "remove"]
    assert missing == PAGES


@pytest.mark.timeout(60)
def test_unmap_in_a_forked_child() -> None:
    features = Feature.EVENT_FORK | Feature.EVENT_UNMAP
    require(features)

    def run(sock: socket.socket) -> None:
        area = make_area("anon", 4)
        uffd = Userfaultfd.new(features)
        uffd.register(area.address, area.length)
        send_msg(sock, area.address, [uffd.fileno()])
        recv_msg(sock)

        def unmapping_process() -> int:
            libc.munmap(area.address + PAGE_SIZE, pages_to_bytes(2))
            return 0

        run_child_and_report(sock, unmapping_process)

    peer = Peer(run)
    uffd, base = peer.recv_uffd(features)
    uffds = [uffd]
    events: list[tuple[int, Event]] = []

    def handle(u: Userfaultfd, event: Event) -> None:
        if isinstance(event, ForkedUffd):
            uffds.append(event.uffd)
        events.append((uffds.index(u), event))

    peer.send("go")
    status = serve(uffds, handle, peer)
    peer.check()
    for u in uffds:
        u.close()
    assert status == 0
    kinds = [(who, type(e).__name__) for who, e in events]
    assert kinds == [(0, "ForkedUffd"), (1, "Unmap")]
    assert events[1][1] == Unmap(base + PAGE_SIZE, base + pages_to_bytes(3))
