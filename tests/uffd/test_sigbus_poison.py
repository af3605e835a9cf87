"""SIGBUS delivery (selftest ``sigbus``) and UFFDIO_POISON (selftest ``poison``).

Accesses that raise SIGBUS run in the C probe (tests/uffd/probe.c), which counts the signals
per page; Python itself cannot survive a SIGBUS on a memory access.
"""

from __future__ import annotations

import os
import socket

import pytest
from uffd_helpers import Peer, Probe, make_area, recv_msg, require, send_msg, serve

from vmmswap.kernel import libc
from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.events import Event, PageFault
from vmmswap.uffd.pagesize import PAGE_SIZE, bytes_to_pages
from vmmswap.uffd.userfaultfd import ForkedUffd, Userfaultfd

PAGES = 8


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_sigbus(kind: str, probe: Probe) -> None:
    features = Feature.SIGBUS | Feature.EVENT_FORK | Feature.MISSING_SHMEM
    require(features)

    def run(sock: socket.socket) -> None:
        area = make_area(kind, PAGES)
        uffd = Userfaultfd.new(features)
        uffd.register(area.address, area.length)
        send_msg(sock, None, [uffd.fileno()])
        recv_msg(sock)
        # 1. Every first access raises SIGBUS instead of an event; the process fills the page
        #    itself (the selftest's signal handler COPYs), then the access succeeds.
        first, values = probe.read(area.address, PAGES)
        for i in range(PAGES):
            uffd.copy(area.page(i), PAGE_SIZE, bytes([i + 1]) * PAGE_SIZE)
        second, filled = probe.read(area.address, PAGES)
        # 2. Release the memory, fork: the child inherits SIGBUS mode and gets SIGBUS on every
        #    page, while the monitor sees no fault events at all.
        advice = libc.MADV_REMOVE if kind == "shmem" else libc.MADV_DONTNEED
        libc.madvise(area.address, area.length, advice)
        pid = os.fork()
        if pid == 0:
            count, _ = probe.read(area.address, PAGES)
            os._exit(0 if count == PAGES else 1)
        _, status = os.waitpid(pid, 0)
        send_msg(sock, (first, values, second, filled, os.waitstatus_to_exitcode(status)))

    peer = Peer(run)
    uffd, _ = peer.recv_uffd(features)
    uffds = [uffd]
    faults: list[Event] = []

    def handle(u: Userfaultfd, event: Event) -> None:
        if isinstance(event, ForkedUffd):
            uffds.append(event.uffd)
        else:
            faults.append(event)

    peer.send("go")
    first, values, second, filled, child = serve(uffds, handle, peer)
    peer.check()
    for u in uffds:
        u.close()
    assert first == PAGES and values == [-1] * PAGES
    assert second == 0 and filled == [i + 1 for i in range(PAGES)]
    assert child == 0, "the forked child did not get SIGBUS on every page"
    assert len(uffds) == 2, "no FORK event"
    assert faults == [], "SIGBUS mode must not report faults"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_poison(kind: str, probe: Probe) -> None:
    """Odd pages are filled with zeros, even ones poisoned: exactly pages/2 SIGBUS."""
    require(Feature.POISON | Feature.MISSING_SHMEM)
    pages = 4  # the selftest's UFFD_POISON_TEST_NPAGES

    def run(sock: socket.socket) -> None:
        area = make_area(kind, pages)
        uffd = Userfaultfd.new(Feature.POISON | Feature.MISSING_SHMEM)
        uffd.register(area.address, area.length)
        send_msg(sock, area.address, [uffd.fileno()])
        uffd.close()
        recv_msg(sock)
        send_msg(sock, probe.read(area.address, pages))

    peer = Peer(run)
    uffd, base = peer.recv_uffd()
    served: list[str] = []

    def handle(u: Userfaultfd, event: Event) -> None:
        assert isinstance(event, PageFault) and event.missing
        if bytes_to_pages(event.address - base) % 2:
            u.copy(event.address, PAGE_SIZE, bytes(PAGE_SIZE))
            served.append("copy")
        else:
            assert u.poison(event.address, PAGE_SIZE) == PAGE_SIZE
            served.append("poison")

    with uffd:
        peer.send("go")
        count, values = serve([uffd], handle, peer)
    peer.check()
    assert count == pages // 2
    assert values == [-1, 0, -1, 0]
    assert served == ["poison", "copy", "poison", "copy"]
