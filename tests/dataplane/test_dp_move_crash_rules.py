"""Move rules for states a crash leaves behind (issue 12), shown without a crash.

A monitor killed between a fault's COPY and clearing the staged bit leaves a stale staged copy
of a page that is in guest memory (harmless: the guest's page wins, it never faults). If the
guest then zeroes that whole hugetlbfs page, the next enable reads zeros, which on hugetlbfs
is also what a hole reads: the page is not staged, and punching it would leave the stale copy
to be served. The move therefore punches such a page only when nothing else holds a copy.
"""

from __future__ import annotations

import pytest

from huge_settings import HugeSettings
from vmmswap.dataplane import move

from .agent import page_digest
from .conftest import RigFactory
from .test_dp_hugetlb import SUB, hugetlb_rig

pytestmark = pytest.mark.timeout(120)

ZERO = page_digest(bytes(4096))


@pytest.mark.parametrize("punch_everything", [False, True])
def test_zeroed_huge_page_with_a_stale_staged_copy_stays(
        huge_settings: HugeSettings, make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch,
        punch_everything: bool) -> None:
    rig = hugetlb_rig(huge_settings, make_rig, 2, readahead=False)
    handler = rig.handler
    rig.write(rig.addr(0), seed=5, pages=2 * SUB)
    assert rig.enable() == 2
    # A fault whose handler dies before clearing the staged bit: the bit stays set.
    with monkeypatch.context() as m:
        m.setattr(handler.staging, "clear_range", lambda start, end: None)
        assert rig.digests(rig.addr(0), 1) == rig.expected(5, 1)
    assert handler.staging.present.get(0)
    rig.write(rig.addr(0), seed=0, pages=SUB)  # the guest zeroes the whole huge page
    if punch_everything:  # the negative control: the rule off
        monkeypatch.setattr(move, "_punch_spans",
                            lambda region, batch, marker: [(batch.remove_start,
                                                            batch.remove_end)])
    rig.enable()
    got = rig.digests(rig.addr(0), 1)
    if punch_everything:
        assert got != [ZERO]  # the stale copy came back: silent corruption
    else:
        assert got == [ZERO]
        # The other huge page, staged normally, comes back from staging.
        assert rig.digests(rig.addr(0, SUB), 1) == [rig.expected(5, 2 * SUB)[SUB]]
