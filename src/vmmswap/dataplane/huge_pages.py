"""Whether guest memory is really on huge pages: the PMD-mapped share of a process's mapping.

A guest on transparent huge pages keeps its TLB reach only while the VMM's mapping of guest
memory is mapped by PMDs. vmm-swap can lose that silently: pages filled back with UFFDIO_COPY
are allocated as small pages. ``ShmemPmdMapped`` in ``/proc/PID/smaps`` is the kernel's count of
shmem bytes a mapping maps with PMDs, so it is what benchmarks and tests compare before enable
and after disable.
"""

from __future__ import annotations

import os
import re
from typing import Final

from vmmswap.kernel import libc

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


def collapse(pid: int, start: int, length: int, chunk: int = 2 * 1024 * 1024) -> int:
    """Collapse ``[start, start + length)`` of process ``pid`` back into huge pages
    (``MADV_COLLAPSE`` through ``process_madvise``); returns the bytes collapsed.

    Why: pages a vmm-swap fill brings back are small pages, so a THP guest comes back from
    disable without its TLB reach. The collapse copies each 2 MiB of shmem into a huge page and
    maps it with a PMD in that process. It runs on unregistered memory (after disable), and it
    is best effort: the kernel answers for the whole range with the last failure of any huge
    page in it (EINVAL, EAGAIN...), so a refused range is retried one ``chunk`` at a time and
    only the chunks the kernel refuses stay on small pages, with their data unchanged. OSError
    only when not even one chunk could be collapsed.
    """
    pidfd = os.pidfd_open(pid)
    try:
        try:
            return _advise_all(pidfd, start, length)
        except OSError as err:
            first_error = err
        done = 0
        for off in range(0, length, chunk):
            try:
                done += _advise_all(pidfd, start + off, min(chunk, length - off))
            except OSError:
                continue
        if not done:
            raise first_error
        return done
    finally:
        os.close(pidfd)


def _advise_all(pidfd: int, start: int, length: int) -> int:
    done = 0
    while done < length:
        n = libc.process_madvise(pidfd, start + done, length - done, libc.MADV_COLLAPSE)
        if n <= 0:
            break
        done += n
    return done
