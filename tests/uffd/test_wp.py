"""Write protection: selftest ``wp-unpopulated`` and a WP fault round trip."""

from __future__ import annotations

import socket

import pytest
from uffd_helpers import (
    Peer,
    make_area,
    pagemap_entry,
    read_bytes,
    recv_msg,
    require,
    run_in_child,
    send_msg,
    serve,
    write_bytes,
)

from vmmswap.kernel import libc
from vmmswap.kernel.uffd import PM_UFFD_WP, Feature, RegisterMode
from vmmswap.uffd.events import Event, PageFault
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd

WP = Feature.PAGEFAULT_FLAG_WP


def wp_unpopulated() -> list[bool]:
    """The selftest's steps on one empty anonymous page; returns the uffd-wp bit after each."""
    area = make_area("anon", 1)
    uffd = Userfaultfd.new(WP | Feature.WP_UNPOPULATED)
    uffd.register(area.address, PAGE_SIZE, RegisterMode.WP)
    bits = []

    def bit() -> None:
        bits.append(bool(pagemap_entry(area.address) & PM_UFFD_WP))

    uffd.write_protect(area.address, PAGE_SIZE)  # a marker on an empty PTE
    bit()
    uffd.write_unprotect(area.address, PAGE_SIZE)
    bit()
    uffd.write_protect(area.address, PAGE_SIZE)
    libc.madvise(area.address, PAGE_SIZE, libc.MADV_DONTNEED)  # zaps the marker
    bit()
    write_bytes(area.address, b"\x01")  # an ordinary fault: no marker left, no uffd event
    bit()
    libc.madvise(area.address, PAGE_SIZE, libc.MADV_DONTNEED)
    uffd.write_protect(area.address, PAGE_SIZE)
    assert read_bytes(area.address, 1) == b"\x00"  # reads through a marker need no handler
    libc.madvise(area.address, PAGE_SIZE, libc.MADV_DONTNEED)
    return bits


@pytest.mark.timeout(30)
def test_wp_unpopulated() -> None:
    require(WP | Feature.WP_UNPOPULATED)
    assert run_in_child(wp_unpopulated) == [True, False, False, False]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_write_to_a_protected_page_is_a_wp_fault(kind: str) -> None:
    """MISSING|WP: a write to a missing page is a plain write fault (supply the page first,
    protected with COPY_MODE_WP); the write then faults again as WP until unprotected."""
    features = WP | Feature.MISSING_SHMEM | Feature.WP_HUGETLBFS_SHMEM
    require(features)

    def run(sock: socket.socket) -> None:
        area = make_area(kind, 1)
        uffd = Userfaultfd.new(features)
        uffd.register(area.address, PAGE_SIZE, RegisterMode.MISSING | RegisterMode.WP)
        send_msg(sock, None, [uffd.fileno()])
        uffd.close()
        recv_msg(sock)
        write_bytes(area.address, b"\x07")
        send_msg(sock, read_bytes(area.address, 2))

    peer = Peer(run)
    uffd, _ = peer.recv_uffd(features)
    faults: list[PageFault] = []

    def handle(u: Userfaultfd, event: Event) -> None:
        assert isinstance(event, PageFault)
        faults.append(event)
        if event.wp:
            u.write_unprotect(event.address, PAGE_SIZE)
        else:
            u.copy(event.address, PAGE_SIZE, b"\x05" * PAGE_SIZE, write_protect=True)

    with uffd:
        peer.send("go")
        assert serve([uffd], handle, peer) == b"\x07\x05"
    peer.check()
    assert [(f.write, f.wp, f.missing) for f in faults] == [(True, False, True),
                                                             (True, True, False)]
