"""What a restore is checked against: the built-in guest's own checksums, taken at snapshot time.

Before a snapshot, :func:`prepare_guest` has the guest write seeded patterns over part of its
data area (the rest is never written, so the memory file has holes) and checksum the whole
data area in chunks; the fills and the checksums go into the state file's ``guest`` object.
After a restore :func:`check_guest` has the *restored* guest checksum the same chunks and
verify every fill against its pattern. The numbers come from the guest's code reading its own
memory through whatever served it (a page-fault handler, or the eager copy), so a wrong,
stale or missing page shows up as a chunk whose checksum differs and as mismatched qwords
with the first bad address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from vmmswap.vm.workload import Workload

CHUNK: Final = 2 << 20
_FILLS: Final = 8


@dataclass
class CheckResult:
    """The restored guest's verdict on its memory."""

    chunks: int
    bad_chunks: list[int] = field(default_factory=list)
    fills: int = 0
    mismatches: int = 0
    first_bad: int | None = None  # guest-physical address of the first wrong qword

    @property
    def ok(self) -> bool:
        return not self.bad_chunks and not self.mismatches and self.chunks > 0

    def describe(self) -> str:
        if self.ok:
            return (f"all {self.chunks} checksums and {self.fills} pattern fills verified by "
                    "the guest")
        where = "" if self.first_bad is None else f", first bad qword at {self.first_bad:#x}"
        return (f"{len(self.bad_chunks)} of {self.chunks} checksums differ (chunks "
                f"{self.bad_chunks[:8]}), {self.mismatches} wrong qwords{where}")


def prepare_guest(workload: Workload, *, written_fraction: float = 0.5) -> dict[str, Any]:
    """Fill ``written_fraction`` of the data area in :data:`_FILLS` seeded runs spread over it,
    then checksum all of it; the dict to store as the state file's ``guest``."""
    size = workload.layout.data_size
    stride = size // _FILLS // CHUNK * CHUNK
    length = max(CHUNK, int(stride * written_fraction) // CHUNK * CHUNK)
    fills = []
    for i in range(_FILLS):
        offset = i * stride
        if offset + length <= size:
            workload.fill(offset, length, i + 1)
            fills.append([offset, length, i + 1])
    sums = workload.checksum(0, size, CHUNK).checksums
    return {"chunk": CHUNK, "data_size": size, "fills": fills, "checksums": sums}


def check_guest(workload: Workload, guest: dict[str, Any]) -> CheckResult:
    """Have the guest checksum and verify its memory against what :func:`prepare_guest` saw."""
    chunk, size = int(guest["chunk"]), int(guest["data_size"])
    if size != workload.layout.data_size:
        raise ValueError(f"the snapshot's data area is {size} bytes, this guest has "
                         f"{workload.layout.data_size}")
    want = [int(v) for v in guest["checksums"]]
    got = workload.checksum(0, size, chunk).checksums
    result = CheckResult(chunks=len(want))
    result.bad_chunks = [i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b]
    if len(got) != len(want):
        result.bad_chunks.append(min(len(got), len(want)))
    for offset, length, seed in guest["fills"]:
        report = workload.verify(int(offset), int(length), int(seed))
        result.fills += 1
        result.mismatches += report.mismatches
        if report.first_bad is not None and result.first_bad is None:
            result.first_bad = report.first_bad
    return result


def change_guest(workload: Workload, guest: dict[str, Any], seed: int = 100) -> dict[str, Any]:
    """After a restore, change memory for a diff snapshot to carry: rewrite the second fill with
    a new seed (diff pages over non-zero base pages) and write a range of the first gap (diff
    pages over holes); the guest checksums again. Returns the new ``guest`` dict."""
    fills = [list(f) for f in guest["fills"]]
    offset, length, _old = fills[1]
    workload.fill(offset, length, seed)
    fills[1] = [offset, length, seed]
    gap = fills[0][0] + fills[0][1]
    workload.fill(gap, CHUNK, seed + 1)
    fills.append([gap, CHUNK, seed + 1])
    sums = workload.checksum(0, int(guest["data_size"]), int(guest["chunk"])).checksums
    return {**guest, "fills": fills, "checksums": sums}
