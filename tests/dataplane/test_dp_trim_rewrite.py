"""Review coverage: trim's "clean page" path after in-place rewrites and a failed swap-out.

A page keeps its file slot after it is faulted back in; a later swap-out rewrites that slot in
place, and a swap-out that fails half-way (ENOSPC) may leave the slot holding part of the new
data while staging still holds all of it. Trim may then call the page clean (mark the file copy
current again) only where the slot holds exactly the staged bytes.
"""

from __future__ import annotations

import errno

import pytest

from dataplane.conftest import RigFactory
from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.uffd.pagesize import PAGE_SIZE

pytestmark = pytest.mark.timeout(120)
P = PAGE_SIZE


def test_clean_path_after_partial_in_place_rewrite(make_rig: RigFactory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig()
    base = rig.addr(0, 0)
    rig.write(base, seed=1, pages=4)
    rig.enable()
    assert rig.out_all() == 4
    rig.check(base, 1, 4)  # faulted back in: slots kept, file copies stale
    rig.write(base, seed=2, pages=4)  # rewritten in guest memory
    rig.enable()
    assert rig.handler.staging_pages == 4 and rig.handler.swap_pages == 0

    real = SwapFile._pwrite_all

    def first_page_then_enospc(self: SwapFile, data: memoryview, offset: int) -> None:
        real(self, data[:P], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SwapFile, "_pwrite_all", first_page_then_enospc)
    with pytest.raises(OSError):
        rig.handler.swap_out()
    monkeypatch.undo()
    # Nothing committed: every page is still staged, no file copy is current.
    assert rig.handler.staging_pages == 4 and rig.handler.swap_pages == 0
    # Slot 0 now holds the new page 0; slots 1-3 still hold the old data.
    ctx = rig.trim_all()
    assert (ctx.zero_pages, ctx.clean_pages) == (0, 1)
    assert rig.handler.staging_pages == 3 and rig.handler.swap_pages == 1
    assert rig.out_all() == 3
    rig.check(base, 2, 4)
    # Round three: unchanged since the last swap-out, so every page is clean.
    rig.enable()
    ctx = rig.trim_all()
    assert (ctx.zero_pages, ctx.clean_pages) == (0, 4)
    rig.check(base, 2, 4)
    # A REMOVE frees the slots; new data must not be matched against a freed slot.
    rig.remove(base, 2 * P)
    assert rig.handler.swap_file.slot(0) == -1 and rig.handler.swap_file.slot(1) == -1
    rig.write(base, seed=2, pages=2)  # the very bytes the freed slots 0-1 still hold
    rig.enable()
    ctx = rig.trim_all()
    assert ctx.clean_pages == 2  # pages 2-3 only: pages 0-1 have no slot any more
    assert rig.out_all() == 2
    rig.check(base, 2, 4)
