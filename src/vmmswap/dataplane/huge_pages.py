"""Whether guest memory is really on huge pages: the PMD-mapped share of a process's mapping.

A guest on transparent huge pages keeps its TLB reach only while the VMM's mapping of guest
memory is mapped by PMDs. vmm-swap can lose that silently: pages filled back with UFFDIO_COPY
are allocated as small pages. ``ShmemPmdMapped`` in ``/proc/PID/smaps`` is the kernel's count of
shmem bytes a mapping maps with PMDs, so it is what benchmarks and tests compare before enable
and after disable.
"""

from __future__ import annotations

import re
from typing import Final

_VMA: Final = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
_KB: Final = 1024


def pmd_mapped_bytes(pid: int, start: int, end: int, field: str = "ShmemPmdMapped") -> int:
    """Bytes of ``field`` (``ShmemPmdMapped``, ``FilePmdMapped``, ``Rss``...) summed over
    the VMAs of process ``pid`` that lie inside ``[start, end)``.

    A VMA straddling the range raises ValueError: its count could not be split honestly.
    """
    total = 0
    inside = False
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as smaps:
        for line in smaps:
            vma = _VMA.match(line)
            if vma is not None:
                lo, hi = int(vma.group(1), 16), int(vma.group(2), 16)
                inside = start <= lo and hi <= end
                if not inside and lo < end and start < hi:
                    raise ValueError(f"VMA [{lo:#x}, {hi:#x}) straddles [{start:#x}, {end:#x})")
                continue
            if inside and line.startswith(field + ":"):
                total += int(line.split()[1]) * _KB
    return total
