"""``vmmswap status --format prometheus``: valid exposition text, base units, nothing missing."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from control_helpers import MIB, Model, TestVmm
from test_control_cli import vmmswap

from vmmswap.control import prometheus
from vmmswap.control.status import SwapMetrics, SwapState, SwapStateTransition, SwapStatus

pytestmark = pytest.mark.timeout(120)

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf'^({_NAME})(\{{{_NAME}="(?:[^"\\\n]|\\.)*"\}})? (\S+)$')


def parse(text: str) -> dict[str, tuple[str, list[tuple[str, float]]]]:
    """A strict reader of the text format: family -> (type, [(labels, value)]).

    Fails on a sample before its HELP/TYPE, a family declared twice, a malformed line, a
    counter without ``_total`` or a name without the vmmswap_ prefix.
    """
    families: dict[str, tuple[str, list[tuple[str, float]]]] = {}
    helped: set[str] = set()
    current: str | None = None
    assert text.endswith("\n") and "\n\n" not in text
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped, f"{name} declared twice"
            helped.add(name)
            current = None
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and name not in families, line
            assert kind in ("gauge", "counter"), line
            assert name.startswith("vmmswap_"), line
            assert kind != "counter" or name.endswith("_total"), line
            families[name] = (kind, [])
            current = name
        else:
            m = _SAMPLE.match(line)
            assert m is not None, f"malformed sample {line!r}"
            assert m.group(1) == current, f"sample {line!r} outside its family"
            families[current][1].append((m.group(2) or "", float(m.group(3))))
    return families


def value(families: dict[str, tuple[str, list[tuple[str, float]]]], name: str) -> float:
    samples = families[f"vmmswap_{name}"][1]
    assert len(samples) == 1
    return samples[0][1]


def huge_status() -> SwapStatus:
    return SwapStatus(
        SwapState.ACTIVE,
        SwapMetrics(resident_pages=3, copied_from_file_pages=5, staging_pages=7, swap_pages=11,
                    readahead_pages=13, faults_avoided=17, page_size=2 * MIB),
        SwapStateTransition(pages=19, time_ms=1500), devices=2)


def test_units_are_base_units_and_the_state_is_one_labelled_gauge() -> None:
    families = parse(prometheus.render(huge_status()))
    assert value(families, "resident_bytes") == 3 * 2 * MIB
    assert value(families, "copied_from_file_bytes_total") == 5 * 2 * MIB
    assert families["vmmswap_copied_from_file_bytes_total"][0] == "counter"
    assert value(families, "swap_bytes") == 11 * 2 * MIB
    assert value(families, "faults_avoided_total") == 17  # a count of faults, not pages
    assert value(families, "state_transition_bytes") == 19 * 2 * MIB
    assert value(families, "state_transition_seconds") == 1.5
    assert value(families, "device_processes") == 2
    assert value(families, "failed") == 0
    states = dict(families["vmmswap_state"][1])
    assert states == {f'{{state="{s}"}}': float(s is SwapState.ACTIVE)
                      for s in dict.fromkeys(SwapState)}
    assert len(states) == 7


def test_every_numeric_field_of_the_status_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    status = huge_status()
    leaves = list(prometheus._leaves(status.to_dict()))
    families = parse(prometheus.render(status))
    assert len(families) == len(leaves) + 2  # + state and failed
    # A field the table does not know yet (as a later status field would be) is still there.
    original = SwapStatus.to_dict

    def with_new_fields(self: SwapStatus) -> dict[str, Any]:
        return {**original(self), "kept_pages": 4, "resume_ms": 250, "restarts": 3}

    monkeypatch.setattr(SwapStatus, "to_dict", with_new_fields)
    families = parse(prometheus.render(status))
    assert value(families, "kept_bytes") == 4 * 2 * MIB
    assert value(families, "resume_seconds") == 0.25
    assert value(families, "monitor_restarts_total") == 3


def test_parse_rejects_what_scrapers_reject() -> None:
    """Negative controls for the reader the tests above rely on."""
    good = prometheus.render(huge_status())
    bad = [good.replace("# TYPE vmmswap_swap_bytes gauge\n", ""),          # no TYPE
           good.replace("vmmswap_swap_bytes 23068672", "vmmswap_swap_bytes 2 3"),
           good.replace("copied_from_file_bytes_total", "copied_from_file_bytes"),
           good + good]
    for text in bad:
        with pytest.raises(AssertionError):
            parse(text)


def test_error_is_a_label_escaped_for_the_format() -> None:
    status = SwapStatus(SwapState.FAILED, error='disk "full"\nat C:\\swap')
    families = parse(prometheus.render(status))
    [(labels, one)] = families["vmmswap_failed"][1]
    assert one == 1
    assert labels == '{error="disk \\"full\\"\\nat C:\\\\swap"}'


def test_textfile_is_replaced_atomically_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "vmmswap.prom"
    target.write_text("old\n")
    prometheus.write_textfile(target, "new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["vmmswap.prom"]  # no temporary left


def test_cli_prints_and_writes_prometheus(make_vmm: Callable[..., TestVmm],
                                          swap_dir: Path, tmp_path: Path) -> None:
    vmm = make_vmm()
    sock = str(swap_dir / "vm.sock")
    vmm.launch(swap_dir, control_socket=sock)
    Model(vmm).write(0, 0, 2 * MIB, seed=1)
    assert vmmswap("enable", sock).returncode == 0
    result = vmmswap("status", "--format", "prometheus", sock)
    assert result.returncode == 0, result.stderr
    families = parse(result.stdout)
    assert value(families, "staging_bytes") == 2 * MIB
    assert dict(families["vmmswap_state"][1])['{state="Pending"}'] == 1
    out = tmp_path / "node" / "vmmswap.prom"
    out.parent.mkdir()
    result = vmmswap("status", "--format", "prometheus", "--output", str(out), sock)
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert value(parse(out.read_text()), "staging_bytes") == 2 * MIB
    result = vmmswap("status", "--output", str(tmp_path / "no" / "dir" / "x.prom"), sock)
    assert result.returncode == 1 and "cannot write" in result.stderr
