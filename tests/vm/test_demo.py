"""The demo's plan and report (no VM needed)."""

from __future__ import annotations

import pytest

from vmmswap.vm.demo import DemoPlan, DemoResult, format_table, main
from vmmswap.vm.swap_session import metrics_dict, state_name, status_transition_pages

MIB = 1 << 20


def test_plan_ranges_are_chunk_aligned_and_ordered() -> None:
    plan = DemoPlan.for_fill(384 * MIB)
    assert plan.zero == 48 * MIB and plan.hot == 24 * MIB and plan.retouch == 96 * MIB
    assert plan.pattern_end + plan.zero == plan.fill
    assert plan.retouch_start + plan.retouch == plan.fill  # re-touch ends with the zeros
    assert plan.rewrite_start + plan.rewrite <= plan.pattern_end


def test_plan_rejects_tiny_fill() -> None:
    with pytest.raises(ValueError, match="too small"):
        DemoPlan.for_fill(2 * MIB)


def test_main_rejects_bad_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--fill", "2"]) == 2
    assert "too small" in capsys.readouterr().err


def test_main_reports_missing_kvm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kvm-device", "/nonexistent/kvm", "--memory", "64", "--fill", "32"]) == 2
    err = capsys.readouterr().err
    assert "KVM is not usable at /nonexistent/kvm" in err and "kvm_intel" in err


def test_table_lists_every_figure() -> None:
    result = DemoResult(memory_mib=128, vcpus=2, regions=2, fill_mib=48, readahead=True,
                        swap="available", states=["Ready", "Pending", "Active", "Ready"],
                        pages_moved=10, pages_trimmed=2, pages_written=8, pages_swapped_in=8,
                        metrics={"copied_from_staging_pages": 1, "copied_from_file_pages": 2,
                                 "zeroed_pages": 3, "readahead_pages": 4, "faults_avoided": 5},
                        retouch_p50_us=12.5, retouch_p99_us=80.0, verdict="PASS",
                        phases=[{"phase": "enable", "seconds": 0.5, "detail": ""}])
    table = format_table(result)
    for label in ("pages moved to staging", "pages trimmed", "pages written", "from staging",
                  "from swap file", "zero pages", "readahead pages", "p50", "p99",
                  "time: enable", "VERIFICATION"):
        assert label in table
    assert "Ready -> Pending -> Active -> Ready" in table
    assert table.rstrip().endswith("-")
    assert "| PASS" in table


class _Transition:
    pages = 7


class _Status:
    state = "Pending"
    state_transition = _Transition()
    metrics = None


def test_status_helpers_accept_duck_types() -> None:
    assert state_name(_Status()) == "Pending"
    assert status_transition_pages(_Status()) == 7
    assert metrics_dict(_Status()) == {}
