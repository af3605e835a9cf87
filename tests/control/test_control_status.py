"""SwapState / SwapStatus: crosvm's names, values and JSON shape."""

from __future__ import annotations

import json

import pytest

from vmmswap.control.status import (
    CROSVM_METRICS,
    StatusFormatError,
    SwapMetrics,
    SwapState,
    SwapStateTransition,
    SwapStatus,
)

CROSVM_STATES = {"Ready": 0, "Failed": 1, "Pending": 2, "TrimInProgress": 3,
                 "SwapOutInProgress": 4, "Active": 5, "SwapInInProgress": 6}


def test_states_have_crosvm_names_and_codes() -> None:
    assert {str(s): s.code for s in SwapState} == CROSVM_STATES
    for name, code in CROSVM_STATES.items():
        assert SwapState(name).value == name
        assert SwapState.from_code(code) is SwapState(name)
    with pytest.raises(ValueError, match="code 7"):
        SwapState.from_code(7)
    assert SwapState.Ready is SwapState.READY and len(SwapState) == 7
    assert SwapState["SwapInInProgress"] is SwapState.SWAP_IN_IN_PROGRESS


def test_enabled_and_in_progress() -> None:
    assert not SwapState.READY.enabled
    assert all(s.enabled for s in SwapState if s is not SwapState.READY)
    assert {s for s in SwapState if s.in_progress} == {
        SwapState.TRIM_IN_PROGRESS, SwapState.SWAP_OUT_IN_PROGRESS,
        SwapState.SWAP_IN_IN_PROGRESS}


def test_json_has_crosvm_shape() -> None:
    status = SwapStatus(SwapState.ACTIVE, SwapMetrics(*range(1, 10)),
                        SwapStateTransition(5, 7), devices=2)
    doc = json.loads(status.to_json())
    assert doc["state"] == "Active"
    assert list(doc["metrics"]) == list(CROSVM_METRICS)
    assert doc["metrics"]["resident_pages"] == 1 and doc["metrics"]["swap_pages"] == 7
    assert doc["state_transition"] == {"pages": 5, "time_ms": 7}
    assert doc["readahead"] == {"readahead_pages": 8, "faults_avoided": 9}
    assert SwapStatus.from_json(status.to_json()) == status


def test_parses_plain_crosvm_output() -> None:
    crosvm = ('{"state":"Pending","metrics":{"resident_pages":1,"copied_from_file_pages":0,'
              '"copied_from_staging_pages":0,"zeroed_pages":0,"redundant_pages":0,'
              '"staging_pages":3,"swap_pages":0},"state_transition":{"pages":3,"time_ms":1}}')
    status = SwapStatus.from_json(crosvm)
    assert status.state is SwapState.PENDING and status.metrics.staging_pages == 3


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(state="Swapping"),
    lambda d: d.update(state=2),
    lambda d: d["metrics"].pop("zeroed_pages"),
    lambda d: d["metrics"].update(extra=1),
    lambda d: d["metrics"].update(zeroed_pages=-1),
    lambda d: d["metrics"].update(zeroed_pages=True),
    lambda d: d["metrics"].update(zeroed_pages=2**64),
    lambda d: d["state_transition"].update(pages="3"),
    lambda d: d.update(unknown=1),
    lambda d: d.pop("metrics"),
    lambda d: d.update(error=5),
])
def test_rejects_malformed(mutate: object) -> None:
    doc = SwapStatus(SwapState.READY).to_dict()
    assert callable(mutate)
    mutate(doc)
    with pytest.raises(StatusFormatError):
        SwapStatus.from_dict(doc)


def test_rejects_non_json() -> None:
    with pytest.raises(StatusFormatError):
        SwapStatus.from_json(b"\xff")
    with pytest.raises(StatusFormatError):
        SwapStatus.from_json("[]")


def test_page_size_is_reported_and_counters_convert_to_bytes() -> None:
    """hugetlbfs guests count pages of 2 MiB: the status says so, and bytes follow from it."""
    huge = 2 * 1024 * 1024
    metrics = SwapMetrics(resident_pages=3, swap_pages=2, page_size=huge)
    status = SwapStatus(SwapState.ACTIVE, metrics)
    doc = json.loads(status.to_json())
    assert doc["page_size"] == huge and doc["metrics"]["swap_pages"] == 2
    back = SwapStatus.from_json(status.to_json())
    assert back.metrics.page_size == huge
    assert back.metrics.bytes_of("swap_pages") == 2 * huge
    assert back.metrics.bytes_dict()["resident_bytes"] == 3 * huge
    del doc["page_size"]  # crosvm's status has no page size: 4 KiB pages
    assert SwapStatus.from_dict(doc).metrics.page_size == 4096
    for bad in (0, 4095, 3 * 4096, -1, "2M"):
        doc["page_size"] = bad
        with pytest.raises(StatusFormatError, match="page_size"):
            SwapStatus.from_dict(doc)
