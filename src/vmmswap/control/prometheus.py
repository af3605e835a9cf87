"""``vmmswap status --format prometheus``: the status in Prometheus' text exposition format.

Why a second rendering of the same status: a node exporter's textfile collector, or any scraper,
reads this format and nothing else, and the JSON's units (pages of a size given elsewhere,
milliseconds) are not the base units Prometheus tools assume. So every page count becomes
bytes, times become seconds, counters end in ``_total`` and gauges carry their unit
(``_bytes``, ``_seconds``), and the state machine's state is one gauge per state, labelled, of
which exactly one is 1.

The rendering is driven by the status JSON itself (:meth:`SwapStatus.to_dict`), not by a fixed
list: a numeric field this table does not know yet is still exported, as a gauge named from its
JSON path, with ``_pages`` turned into bytes and ``_ms`` into seconds. A field added to the
status can therefore never be silently missing from the scrape.

The format: https://prometheus.io/docs/instrumenting/exposition_formats/ (HELP and TYPE lines
before each family; label values escape backslash, double quote and newline).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from vmmswap.control.status import SwapState, SwapStatus

PREFIX: Final = "vmmswap_"


@dataclass(frozen=True, slots=True)
class _Family:
    """How one JSON field is exported: its metric name, type and help text."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    #: What the JSON value counts: "pages" (times the page size -> bytes), "ms" (-> seconds),
    #: or "" (exported as it is).
    unit: str = ""

    def value(self, raw: float, page_size: int) -> float:
        if self.unit == "pages":
            return raw * page_size
        if self.unit == "ms":
            return raw / 1000
        return raw


#: JSON path -> family. Paths are the keys of SwapStatus.to_dict(), nested ones joined by ".".
_KNOWN: Final[dict[str, _Family]] = {
    "metrics.resident_pages": _Family(
        "resident_bytes", "gauge", "Guest memory resident in the VMM's memfds.", "pages"),
    "metrics.copied_from_file_pages": _Family(
        "copied_from_file_bytes_total", "counter",
        "Bytes filled into guest memory from the swap file since the last enable.", "pages"),
    "metrics.copied_from_staging_pages": _Family(
        "copied_from_staging_bytes_total", "counter",
        "Bytes filled into guest memory from staging since the last enable.", "pages"),
    "metrics.zeroed_pages": _Family(
        "zeroed_bytes_total", "counter",
        "Bytes zero-filled (pages never written) since the last enable.", "pages"),
    "metrics.redundant_pages": _Family(
        "redundant_bytes_total", "counter",
        "Bytes faulted that were already present (EEXIST) since the last enable.", "pages"),
    "metrics.staging_pages": _Family(
        "staging_bytes", "gauge", "Guest memory held in staging memory.", "pages"),
    "metrics.swap_pages": _Family(
        "swap_bytes", "gauge", "Guest memory held in the swap file.", "pages"),
    "readahead.readahead_pages": _Family(
        "readahead_bytes_total", "counter",
        "Bytes filled beyond the faulting pages by readahead since the last enable.", "pages"),
    "readahead.faults_avoided": _Family(
        "faults_avoided_total", "counter",
        "Faults the guest did not take because readahead had filled the page."),
    "state_transition.pages": _Family(
        "state_transition_bytes", "gauge",
        "Bytes handled by the last (or running) state transition.", "pages"),
    "state_transition.time_ms": _Family(
        "state_transition_seconds", "gauge",
        "Duration of the last (or running) state transition.", "ms"),
    "devices": _Family(
        "device_processes", "gauge", "Device processes whose userfaultfds the monitor serves."),
    "page_size": _Family(
        "page_size_bytes", "gauge", "Bytes per guest page (2 MiB on hugetlbfs)."),
    "frozen_seconds": _Family(
        "enable_frozen_seconds", "gauge",
        "How long the last enable kept the VMM and its devices frozen."),
    "dirty_tracking.kept_pages": _Family(
        "dirty_tracking_kept_bytes", "gauge",
        "Guest memory whose swap-file copy is kept and still current unless written.", "pages"),
    "dirty_tracking.dirty_pages": _Family(
        "dirty_tracking_dirty_bytes", "gauge",
        "Kept pages the last enable found written (copied to staging).", "pages"),
    "dirty_tracking.released_pages": _Family(
        "dirty_tracking_released_bytes", "gauge",
        "Kept pages the last enable released from guest memory without a copy.", "pages"),
    "dirty_tracking.released_total_pages": _Family(
        "dirty_tracking_released_bytes_total", "counter",
        "Guest memory released without a copy by every enable of this monitor.", "pages"),
    "restarts": _Family(
        "monitor_restarts_total", "counter", "Times the monitor died and was replaced."),
    "last_resume_seconds": _Family(
        "monitor_last_resume_seconds", "gauge",
        "Time from the last monitor death to its successor serving faults."),
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _leaves(value: dict[str, Any], path: str = "") -> Iterator[tuple[str, float]]:
    """Every numeric leaf of the status JSON with its dotted path (bools are not numbers)."""
    for key, item in value.items():
        where = f"{path}{key}"
        if isinstance(item, dict):
            yield from _leaves(item, where + ".")
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            yield where, item


def _derived(path: str) -> _Family:
    """The family of a field the table does not know: a gauge named from its path."""
    stem = path.replace(".", "_")
    if stem.endswith("_pages"):
        return _Family(stem.removesuffix("_pages") + "_bytes", "gauge", f"{path} in bytes.",
                       "pages")
    if stem.endswith("_ms"):
        return _Family(stem.removesuffix("_ms") + "_seconds", "gauge", f"{path} in seconds.",
                       "ms")
    return _Family(stem, "gauge", f"{path}.")


def render(status: SwapStatus) -> str:
    """The whole status as exposition text (ends with a newline)."""
    lines: list[str] = []

    def family(f: _Family) -> None:
        lines.append(f"# HELP {PREFIX}{f.name} {f.help}")
        lines.append(f"# TYPE {PREFIX}{f.name} {f.kind}")

    family(_Family("state", "gauge", "The vmm-swap state: 1 for the current state, 0 else."))
    for state in dict.fromkeys(SwapState):  # aliases collapse to the canonical members
        value = 1 if state is status.state else 0
        lines.append(f'{PREFIX}state{{state="{_label(str(state))}"}} {value}')
    family(_Family("failed", "gauge", "1 when the last command failed or the state is Failed."))
    failed = status.error is not None or status.state is SwapState.FAILED
    if status.error is not None:
        lines.append(f'{PREFIX}failed{{error="{_label(status.error)}"}} 1')
    else:
        lines.append(f"{PREFIX}failed {int(failed)}")

    page_size = status.metrics.page_size
    for path, raw in _leaves(status.to_dict()):
        f = _KNOWN.get(path) or _derived(path)
        family(f)
        lines.append(f"{PREFIX}{f.name} {_number(f.value(raw, page_size))}")
    return "\n".join(lines) + "\n"


def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (a textfile collector never reads half a file).

    The file is written beside ``path`` and renamed over it; mode 0644 so the collector, which
    may run as another user, can read it (it holds counters, nothing secret).
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".vmmswap-", suffix=".prom.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
