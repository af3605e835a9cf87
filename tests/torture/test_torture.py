"""The torture harness in the suite: seeds from VMMSWAP_TORTURE_SEED / VMMSWAP_TORTURE_COUNT.

``COUNT`` scenarios in all (CI default 200): a quarter on the KVM micro-VM (the guest tortures
its own memory on both vCPUs), the rest host scenarios (worker threads, device processes), both
from seed ``FIRST``. The negative controls prove the checks can fail: a page is dropped behind
the model's (or the guest's) back, and every such scenario must fail, naming a zero page.
"""

from __future__ import annotations

import os

import pytest

from .runner import run_seeds

pytestmark = [pytest.mark.torture, pytest.mark.timeout(900)]
FIRST = int(os.environ.get("VMMSWAP_TORTURE_SEED", "0"))
COUNT = int(os.environ.get("VMMSWAP_TORTURE_COUNT", "200"))
KVM_COUNT = max(1, COUNT // 4)
HOST_COUNT = max(1, COUNT - KVM_COUNT)


def _failures(summary_failures: list[dict[str, object]]) -> str:
    return "\n\n".join(str(f["error"]) for f in summary_failures)


def test_torture_scenarios() -> None:
    summary = run_seeds(range(FIRST, FIRST + HOST_COUNT), jobs=2,
                        kvm_seeds=range(FIRST, FIRST + KVM_COUNT))
    print(summary.line())
    assert len(summary.results) == HOST_COUNT + KVM_COUNT
    assert sum(r["kind"] == "kvm" for r in summary.results) == KVM_COUNT
    assert not summary.failures, _failures(summary.failures)
    assert summary.total("commands") > 0 and summary.total("pages_checked") > 0
    assert summary.total("guest_pages_checked") > 0 and summary.total("guest_writes") > 0
    if os.environ.get("VMMSWAP_TORTURE_KILLS", "both") != "none" and COUNT >= 40:
        assert summary.total("restarts") > 0, "monitor kills were drawn but none restarted"
    if COUNT >= 40:
        assert summary.total("parks") > 0, "no park was drawn"


def test_torture_negative_control_detects_a_zero_page() -> None:
    summary = run_seeds(range(FIRST, FIRST + 4), jobs=2, corrupt=True,
                        kvm_seeds=range(FIRST, FIRST + 4))
    assert len(summary.failures) == 8, [(r["kind"], r["seed"]) for r in summary.results
                                        if r["ok"]]
    assert all("zero" in str(f["error"]) for f in summary.failures), _failures(
        summary.failures)
    assert all("CORRUPT" in str(f["error"]) for f in summary.failures if f["kind"] == "host")


def test_torture_negative_control_detects_a_missed_dirty_page() -> None:
    """Dirty tracking's negative control: the scan of the second enable loses one written
    page, whose stale file copy is then served; every such scenario must fail on a page's
    content (an older version, which is zeros where the page was zeros then)."""
    summary = run_seeds(range(FIRST, FIRST + 4), jobs=2, skip_written=True)
    assert len(summary.failures) == 4, [r["seed"] for r in summary.results if r["ok"]]
    assert all("after the final disable" in str(f["error"])
               and "expected version" in str(f["error"]) for f in summary.failures), _failures(
        summary.failures)


def test_torture_negative_control_detects_a_park_that_misses_staging() -> None:
    """The park check's negative control: right after an enable, the park stores the guest
    memfds alone (what a park knowing nothing of staging would); every scenario with a shared
    page written before launch must fail on a page of the park's memory file."""
    summary = run_seeds(range(FIRST, FIRST + 4), jobs=2, park_memfds=True)
    assert len(summary.failures) == 4, [r["seed"] for r in summary.results if r["ok"]]
    assert all("a park's memory file" in str(f["error"]) for f in summary.failures), _failures(
        summary.failures)
