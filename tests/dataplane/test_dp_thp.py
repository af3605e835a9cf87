"""Guest memory on real transparent huge pages (shmem THP), through a whole vmm-swap cycle.

The fixture turns shmem THP on (``advise`` plus MADV_HUGEPAGE on the guest mapping, or
``always``) and restores the old mode afterwards. Each test first shows that huge pages really
formed (``ShmemPmdMapped`` of the VMM child's guest mapping), so none of them can pass on small
pages by accident.
"""

from __future__ import annotations

from typing import Any

import pytest

from huge_settings import HugeSettings
from vmmswap.dataplane import move
from vmmswap.dataplane.huge_pages import collapse, pmd_mapped_bytes
from vmmswap.uffd.pagesize import PAGE_SIZE, THP_SIZE

from .agent import page_digest
from .conftest import MiB, Rig, RigFactory

pytestmark = pytest.mark.skipif(2 * MiB != THP_SIZE, reason="the PMD size is not 2 MiB")

ZERO = page_digest(bytes(PAGE_SIZE))


def pmd_mapped(rig: Rig) -> int:
    spec = rig.guest.specs[0]
    return pmd_mapped_bytes(rig.vmm.proc.pid, spec.host_addr, spec.host_end)


@pytest.mark.parametrize("mode", ["advise", "always"])
def test_thp_guest_survives_enable_trim_out_faults_disable(
        huge_settings: HugeSettings, make_rig: RigFactory, mode: str) -> None:
    huge_settings.shmem_thp(mode)
    size = 16 * MiB
    pages = size // PAGE_SIZE
    written = 3000  # ends inside the sixth huge page: its tail is zero (trim drops it)
    # Registered after the guest filled its memory (as at enable): a MISSING fault would be
    # filled with small pages.
    rig = make_rig([(0, size)], backing="thp", readahead=True, register=False)
    assert rig.guest.specs[0].host_addr % THP_SIZE == 0
    rig.write(rig.addr(0), seed=7, pages=written)
    rig.guest.register()
    huge = 6 * THP_SIZE  # the huge pages the writes touched
    assert pmd_mapped(rig) == huge, "shmem THP did not form huge pages for the guest"

    assert rig.enable() == huge // PAGE_SIZE
    assert pmd_mapped(rig) == 0
    ctx = rig.trim_all()
    assert ctx.zero_pages == huge // PAGE_SIZE - written
    assert rig.out_all() == written
    assert rig.handler.staging_pages == 0

    # Faults bring back the first half; disable brings back the rest.
    half = written // 2
    assert rig.digests(rig.addr(0), half) == rig.expected(7, half)
    assert rig.server.faults
    rig.swap_in_all()
    # Every page that held data is back without a fault; trimmed and untouched ones fault.
    assert rig.digests_quietly(rig.addr(0), written) == rig.expected(7, written)
    got = rig.digests(rig.addr(0), pages)
    assert got[:written] == rig.expected(7, written)
    assert got[written:] == [ZERO] * (pages - written)


def _naive_plan(extents: Any, region_size: int,
                batch_bytes: int = move.DEFAULT_BATCH_BYTES) -> list[move.MoveBatch]:
    """A plan that ignores huge pages: 1 MiB batches, each removing exactly what it copied."""
    step = THP_SIZE // 2
    batches = []
    for start, end in extents:
        for lo in range(start, end, step):
            hi = min(end, lo + step)
            batches.append(move.MoveBatch([(lo, hi)], lo, hi))
    return batches


@pytest.mark.parametrize("plan", ["real", "ignores huge pages"])
def test_batches_that_cut_a_huge_page_lose_data(
        huge_settings: HugeSettings, make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch,
        plan: str) -> None:
    """The move plan's alignment is load-bearing (negative control of the real plan).

    A device holding a reference on one page of a huge page (I/O in flight; here a vmsplice
    into a pipe) makes the kernel's split of that huge page fail. A hole punch over part of it
    then zeroes the range *in place*: the page stays in the memfd, the VMM's next access does
    not fault, and the guest reads zeros where its data was. Punching whole huge pages removes
    them whatever references exist, so the next access faults and is served from staging.
    """
    huge_settings.shmem_thp("advise")
    size = 8 * MiB
    pages = size // PAGE_SIZE
    rig = make_rig([(0, size)], backing="thp", register=False)
    rig.write(rig.addr(0), seed=11, pages=pages)
    rig.guest.register()
    assert pmd_mapped(rig) == size
    for huge in range(0, size, THP_SIZE):
        rig.vmm.request({"op": "pin", "addr": rig.addr(0) + huge + THP_SIZE * 3 // 4})
    if plan != "real":
        monkeypatch.setattr(move, "plan_batches", _naive_plan)
    rig.enable()
    rig.vmm.request({"op": "unpin"})
    got = rig.digests(rig.addr(0), pages)
    lost = sum(g != e for g, e in zip(got, rig.expected(11, pages), strict=True))
    if plan == "real":
        assert lost == 0
    else:
        assert lost > 0, "a partial punch of a pinned huge page lost nothing: control is dead"
        assert got.count(ZERO) == lost


def test_collapse_after_disable_brings_huge_pages_back(
        huge_settings: HugeSettings, make_rig: RigFactory) -> None:
    """Fills bring a THP guest back on small pages (the control: 0 PMD-mapped after the
    cycle); MADV_COLLAPSE through process_madvise on the VMM, once unregistered, maps the
    same data with PMDs again."""
    huge_settings.shmem_thp("advise")
    size = 8 * MiB
    pages = size // PAGE_SIZE
    rig = make_rig([(0, size)], backing="thp", register=False)
    rig.write(rig.addr(0), seed=13, pages=pages)
    rig.guest.register()
    assert pmd_mapped(rig) == size
    rig.enable()
    rig.out_all()
    rig.swap_in_all()
    assert rig.digests_quietly(rig.addr(0), pages) == rig.expected(13, pages)
    assert pmd_mapped(rig) == 0, "fills made huge pages: the collapse below proves nothing"
    spec = rig.guest.specs[0]
    rig.guest.uffd.unregister(spec.host_addr, spec.size)  # what disable does
    assert collapse(rig.vmm.proc.pid, spec.host_addr, spec.size) == size
    assert pmd_mapped(rig) == size
    assert rig.digests_quietly(rig.addr(0), pages) == rig.expected(13, pages)
