"""The torture harness in the suite: seeds from VMMSWAP_TORTURE_SEED / VMMSWAP_TORTURE_COUNT.

CI defaults: seeds 0..39. The negative control proves the check can fail: a worker drops a page
behind the model's back (a zero page where data was) and every such scenario must fail.
"""

from __future__ import annotations

import os

import pytest

from .runner import run_seeds

pytestmark = [pytest.mark.torture, pytest.mark.timeout(600)]
FIRST = int(os.environ.get("VMMSWAP_TORTURE_SEED", "0"))
COUNT = int(os.environ.get("VMMSWAP_TORTURE_COUNT", "40"))


def test_torture_scenarios() -> None:
    summary = run_seeds(range(FIRST, FIRST + COUNT), jobs=2)
    assert len(summary.results) == COUNT
    assert not summary.failures, "\n\n".join(str(f["error"]) for f in summary.failures)
    assert summary.total("commands") > 0 and summary.total("pages_checked") > 0


def test_torture_negative_control_detects_a_zero_page() -> None:
    summary = run_seeds(range(FIRST, FIRST + 4), jobs=2, corrupt=True)
    assert len(summary.failures) == 4, [r["seed"] for r in summary.results if r["ok"]]
    assert all("CORRUPT" in str(f["error"]) and "zero page" in str(f["error"])
               for f in summary.failures)
