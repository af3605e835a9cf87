"""A dead process gives the process-gone error (ESRCH from fills, ENOMEM from (un)register)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import pytest
from uffd_helpers import Peer, make_area, send_msg

from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.errors import ProcessGoneError
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd


@pytest.mark.timeout(30)
def test_a_dead_process_gives_process_gone() -> None:
    features = Feature.MOVE | Feature.POISON

    def run(sock: socket.socket) -> None:
        area = make_area("anon", 2)
        uffd = Userfaultfd.new(features)
        uffd.register(area.address, area.length)
        send_msg(sock, area.address, [uffd.fileno()])

    peer = Peer(run)
    uffd, base = peer.recv_uffd(features)
    peer.check()  # the process has exited; its uffd lives on in this one
    with uffd:
        calls: dict[str, Callable[[], object]] = {
            "copy": lambda: uffd.copy(base, PAGE_SIZE, bytes(PAGE_SIZE)),
            "copy_all": lambda: uffd.copy_all(base, PAGE_SIZE, bytes(PAGE_SIZE)),
            "zero": lambda: uffd.zero(base, PAGE_SIZE),
            "poison": lambda: uffd.poison(base, PAGE_SIZE),
            "register": lambda: uffd.register(base, PAGE_SIZE),
            "unregister": lambda: uffd.unregister(base, PAGE_SIZE),
        }
        for name, call in calls.items():
            with pytest.raises(ProcessGoneError) as info:
                call()
            assert isinstance(info.value, ProcessLookupError), name
            expected = errno.ENOMEM if "register" in name else errno.ESRCH
            assert info.value.errno == expected, name
            assert "exited" in str(info.value)
        assert uffd.read_events() == []
