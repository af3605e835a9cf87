"""Selftests ``minor`` and ``minor-wp`` on shmem: MINOR faults resolved with UFFDIO_CONTINUE.

The peer fills the page cache through an unregistered mapping of its memfd, then reads through
the registered one. The monitor bit-flips each page through its own mapping of the memfd and
maps it with CONTINUE (write-protected for ``minor-wp``); a second CONTINUE must be EEXIST.
"""

from __future__ import annotations

import os
import socket

import pytest
from uffd_helpers import Peer, make_area, pagemap_entry, read_bytes, recv_msg, require, send_msg
from uffd_helpers import serve as serve_peer

from vmmswap.kernel.uffd import PM_UFFD_WP, Feature, RegisterMode
from vmmswap.uffd.errors import PageExistsError
from vmmswap.uffd.events import Event, PageFault
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, pages_to_bytes
from vmmswap.uffd.userfaultfd import Userfaultfd

PAGES = 8


def minor_peer(features: Feature, mode: RegisterMode) -> Peer:
    def run(sock: socket.socket) -> None:
        area = make_area("shmem", PAGES)
        assert area.alias is not None and area.memfd is not None
        uffd = Userfaultfd.new(features)
        uffd.register(area.address, area.length, mode)
        # Populating through the unregistered alias raises no fault.
        for i in range(PAGES):
            area.alias.write(pages_to_bytes(i), bytes([i % 255]) * PAGE_SIZE)
        send_msg(sock, area.address, [uffd.fileno(), area.memfd])
        uffd.close()
        recv_msg(sock)
        contents = [read_bytes(area.page(i), PAGE_SIZE) for i in range(PAGES)]
        wp = [bool(pagemap_entry(area.page(i)) & PM_UFFD_WP) for i in range(PAGES)]
        send_msg(sock, (contents, wp))

    return Peer(run)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("test_wp", [False, True], ids=["minor", "minor-wp"])
def test_minor(test_wp: bool) -> None:
    features = Feature.MINOR_SHMEM
    mode = RegisterMode.MINOR
    if test_wp:
        # As in the selftest, WP_UNPOPULATED stands for "MINOR mode supports write-protect".
        features |= Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED \
            | Feature.WP_HUGETLBFS_SHMEM
        mode |= RegisterMode.WP
    require(features)
    peer = minor_peer(features, mode)
    payload, fds = peer.recv()
    base = payload
    uffd = Userfaultfd.from_raw_descriptor(fds[0], features)
    memfd = fds[1]
    counts = {"minor": 0, "missing": 0, "eexist": 0}
    with uffd, Mapping.map_fd(memfd, pages_to_bytes(PAGES)) as cache:
        os.close(memfd)

        def handle(u: Userfaultfd, event: Event) -> None:
            assert isinstance(event, PageFault)
            if not event.minor:
                counts["missing"] += 1
                return
            counts["minor"] += 1
            offset = event.address - base
            page = cache.read(offset, PAGE_SIZE)
            cache.write(offset, bytes(b ^ 0xFF for b in page))  # bit-flip via the page cache
            # Without waking, so the faulter (which exits when done) still exists for the retry.
            u.continue_(event.address, PAGE_SIZE, wake=False, write_protect=test_wp)
            try:
                u.continue_(event.address, PAGE_SIZE, write_protect=test_wp)
            except PageExistsError:
                counts["eexist"] += 1
            u.wake(event.address, PAGE_SIZE)

        peer.send("go")
        contents, wp = serve_peer([uffd], handle, peer)
    peer.check()
    for i, page in enumerate(contents):
        assert page == bytes([~(i % 255) & 0xFF]) * PAGE_SIZE, f"page {i}"
    assert counts == {"minor": PAGES, "missing": 0, "eexist": PAGES}
    assert wp == [test_wp] * PAGES
