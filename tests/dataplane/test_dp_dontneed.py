"""Review: MADV_DONTNEED on guest memory (a MAP_SHARED memfd) is not a discard.

On shmem, MADV_DONTNEED only drops the caller's page-table entries: the page cache -- the data
-- stays, and the next access reads it back. The kernel still sends UFFD_EVENT_REMOVE for it
(mm/madvise.c calls userfaultfd_remove for DONTNEED as for REMOVE), and the page handler treats
every REMOVE as "the guest gave these pages back": it drops the staged / swapped copy, and the
next access is served a zero page. Without vmm-swap the same access returns the data.
"""

from __future__ import annotations

import pytest

from dataplane.conftest import RigFactory
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE

pytestmark = pytest.mark.timeout(60)
P = PAGE_SIZE


@pytest.mark.xfail(strict=True, reason="review: a REMOVE event from MADV_DONTNEED on shared "
                   "guest memory drops staged data (page_handler.handle_remove); the event "
                   "cannot tell DONTNEED from REMOVE, so the contract must forbid DONTNEED")
def test_dontneed_on_shared_guest_memory_keeps_data(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.write(rig.addr(0, 0), seed=3, pages=4)
    rig.enable()  # the pages are in staging; guest memory has holes there
    rig.vmm.request({"op": "remove", "addr": rig.addr(0, 0), "length": 4 * P,
                     "advice": libc.MADV_DONTNEED}, rig.server)
    assert rig.server.removes, "the kernel sent no REMOVE event for MADV_DONTNEED"
    rig.check(rig.addr(0, 0), 3, 4)
