"""Huge-page settings for a VM's run: reserving 2 MiB hugetlb pages, shmem THP, and restoring.

hugetlbfs guest memory needs huge pages in the kernel's pool (``/proc/sys/vm/nr_hugepages``,
0 by default). The demo grows the pool by what it lacks for its run and puts the old size back
when it ends, whatever happens, so a run leaves the machine as it found it. Only root may
resize the pool; anyone else gets an error saying what to run.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType
from typing import Final

NR_HUGEPAGES: Final = Path("/proc/sys/vm/nr_hugepages")
SHMEM_ENABLED: Final = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
MEMINFO: Final = Path("/proc/meminfo")


def meminfo_field(name: str, meminfo: Path = MEMINFO) -> int:
    """A /proc/meminfo field (kB for sizes, a count for HugePages_*)."""
    for line in meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == name:
            return int(rest.split()[0])
    raise KeyError(name)


class HugetlbPool:
    """Makes ``pages`` free default-size huge pages available; :meth:`close` restores the pool.

    Raises OSError with a hint when the pool cannot be grown (not root, or memory too
    fragmented for the kernel to find the pages).
    """

    def __init__(self, pages: int, page_kib: int = 2048) -> None:
        if meminfo_field("Hugepagesize") != page_kib:
            raise OSError(f"the default hugetlb page is {meminfo_field('Hugepagesize')} KiB, "
                          f"not {page_kib} KiB")
        self._old: str | None = None
        free = meminfo_field("HugePages_Free")
        if free >= pages:
            return
        old = NR_HUGEPAGES.read_text().strip()
        want = int(old) + pages - free
        try:
            NR_HUGEPAGES.write_text(str(want))
        except OSError as err:
            raise OSError(err.errno, f"cannot reserve {pages} huge pages of {page_kib} KiB "
                          f"({free} free): run 'echo {want} > {NR_HUGEPAGES}' as root "
                          f"({err.strerror})") from err
        self._old = old
        got = meminfo_field("HugePages_Free")
        if got < pages:
            self.close()
            raise OSError(f"the kernel found only {got} free huge pages of {page_kib} KiB, "
                          f"{pages} are needed (memory too fragmented?)")

    @property
    def changed(self) -> bool:
        """Whether the pool was grown (and will be shrunk back)."""
        return self._old is not None

    def close(self) -> None:
        """Put the pool's old size back. Idempotent."""
        if self._old is not None:
            old, self._old = self._old, None
            NR_HUGEPAGES.write_text(old)

    def __enter__(self) -> HugetlbPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ShmemThpMode:
    """shmem THP set to ``mode`` (``advise``: huge pages for MADV_HUGEPAGE mappings) for a run;
    :meth:`close` puts the old mode back. OSError when it cannot be set (not root)."""

    def __init__(self, mode: str) -> None:
        match = re.search(r"\[(\w+)\]", SHMEM_ENABLED.read_text())
        if match is None:
            raise OSError(f"cannot parse {SHMEM_ENABLED}")
        self._old: str | None = match.group(1)
        try:
            SHMEM_ENABLED.write_text(mode)
        except OSError as err:
            raise OSError(err.errno, f"cannot set {SHMEM_ENABLED} to {mode} "
                          f"({err.strerror}): as root") from err

    def close(self) -> None:
        if self._old is not None:
            old, self._old = self._old, None
            SHMEM_ENABLED.write_text(old)

    def __enter__(self) -> ShmemThpMode:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
