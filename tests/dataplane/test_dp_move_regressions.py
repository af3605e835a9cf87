"""Review: the move to staging must leave every page in exactly one place on *any* failure.

``move.move_to_staging`` submits every batch first and marks batches present only in the loop
that follows. If a later ``submit`` raises (``RuntimeError: can't start new thread`` under
thread or memory pressure -- exactly when vmm-swap is used), the batches already submitted still
run to completion: they copy to staging *and punch the guest*, but nothing ever marks them
present. Their pages are then nowhere, and the next fault serves a zero page.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dataplane.conftest import RigFactory
from vmmswap.dataplane import move
from vmmswap.uffd.pagesize import PAGE_SIZE

pytestmark = pytest.mark.timeout(120)
P = PAGE_SIZE


class _SecondSubmitFails(ThreadPoolExecutor):
    """An executor whose second ``submit`` fails the way thread creation does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._submits = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self._submits += 1
        if self._submits == 2:
            raise RuntimeError("can't start new thread")
        return super().submit(*args, **kwargs)


def test_failed_submit_loses_no_page(make_rig: RigFactory,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Two regions: one batch each, so two submits.
    rig = make_rig([(0, 16 * P), (1 << 30, 16 * P)])
    rig.write(rig.addr(0, 0), seed=7, pages=16)
    rig.write(rig.addr(1, 0), seed=8, pages=16)
    monkeypatch.setattr(move, "ThreadPoolExecutor", _SecondSubmitFails)
    with pytest.raises(RuntimeError):
        rig.enable()
    monkeypatch.undo()
    # Whatever the failure, every page must still be somewhere the handler can serve it from.
    rig.check(rig.addr(0, 0), 7, 16)
    rig.check(rig.addr(1, 0), 8, 16)
