"""The data plane's counters: ``SwapMetrics``, crosvm's seven page counters plus readahead's two.

The page handler keeps them and the control plane reports them (``vmmswap status``), so they
live here, where both can see them; :mod:`vmmswap.control.status` re-exports them with the rest of
the status document. Parsing is strict: a status that does not parse means the two sides
disagree about the protocol, which must be an error rather than a guess.

``copied_from_*_pages`` count every page a fault filled from that source, readahead pages
included; ``readahead_pages`` is the part filled beyond the faulting pages, and
``faults_avoided`` the part the guest then walked through without faulting. The fault counters
count since the last move to staging, like crosvm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from vmmswap.uffd.pagesize import PAGE_SIZE

__all__ = ["CROSVM_METRICS", "READAHEAD_METRICS", "StatusFormatError", "SwapMetrics",
           "parse_object", "parse_u64"]


#: The counters crosvm's ``SwapMetrics`` has, in its order: the only keys of ``"metrics"``.
CROSVM_METRICS: Final = (
    "resident_pages",
    "copied_from_file_pages",
    "copied_from_staging_pages",
    "zeroed_pages",
    "redundant_pages",
    "staging_pages",
    "swap_pages",
)
#: Counters this project adds; reported under the top-level ``"readahead"`` key.
READAHEAD_METRICS: Final = ("readahead_pages", "faults_avoided")

_U64_MAX: Final = 2**64 - 1


class StatusFormatError(ValueError):
    """A status document does not have crosvm's shape (or this project's extensions)."""


def parse_u64(value: Any, where: str) -> int:
    # bool is an int subclass; True is not a page count.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise StatusFormatError(f"{where} must be an unsigned 64-bit integer, got {value!r}")
    return value


def parse_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StatusFormatError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class SwapMetrics:
    """Page counters. The fault counters count since the last ``enable`` (crosvm resets them
    at every move to staging); ``resident_pages`` is measured even while disabled."""

    resident_pages: int = 0
    copied_from_file_pages: int = 0
    copied_from_staging_pages: int = 0
    zeroed_pages: int = 0
    redundant_pages: int = 0
    staging_pages: int = 0
    swap_pages: int = 0
    readahead_pages: int = 0
    faults_avoided: int = 0
    #: Bytes per page of every counter: the guest's page (2 MiB for hugetlbfs memory).
    page_size: int = PAGE_SIZE

    def bytes_of(self, name: str) -> int:
        """A page counter in bytes."""
        if name not in CROSVM_METRICS and name not in READAHEAD_METRICS:
            raise KeyError(name)
        return int(getattr(self, name)) * self.page_size

    def bytes_dict(self) -> dict[str, int]:
        """Every page counter in bytes (``<name>`` with ``_pages`` made ``_bytes``)."""
        return {name.removesuffix("_pages") + "_bytes": self.bytes_of(name)
                for name in (*CROSVM_METRICS, *READAHEAD_METRICS)}

    def crosvm_dict(self) -> dict[str, int]:
        """The seven counters crosvm reports, in crosvm's order."""
        return {name: getattr(self, name) for name in CROSVM_METRICS}

    def readahead_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in READAHEAD_METRICS}

    @classmethod
    def from_dicts(cls, metrics: dict[str, Any], readahead: dict[str, Any] | None = None,
                   page_size: int = PAGE_SIZE) -> SwapMetrics:
        """Parse the ``metrics`` object (all seven counters required, no others allowed) and
        the optional ``readahead`` object (missing counters are 0, as from crosvm itself)."""
        metrics = parse_object(metrics, "metrics")
        missing = [n for n in CROSVM_METRICS if n not in metrics]
        extra = sorted(set(metrics) - set(CROSVM_METRICS))
        if missing or extra:
            raise StatusFormatError(f"metrics: missing {missing}, unexpected {extra}")
        values = {n: parse_u64(metrics[n], f"metrics.{n}") for n in CROSVM_METRICS}
        if readahead is not None:
            readahead = parse_object(readahead, "readahead")
            extra = sorted(set(readahead) - set(READAHEAD_METRICS))
            if extra:
                raise StatusFormatError(f"readahead: unexpected {extra}")
            values.update({n: parse_u64(v, f"readahead.{n}") for n, v in readahead.items()})
        return cls(**values, page_size=page_size)
