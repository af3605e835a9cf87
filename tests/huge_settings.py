"""Kernel huge-page settings for a test: shmem THP mode and reserved hugetlb pages.

Both are machine-wide, so every change is undone when the test ends, whatever happens: the old
values are read before the first write and written back in ``close`` (a fixture's teardown).
Where the settings cannot be written (not root, read-only sysfs), the test is skipped with the
reason; CI runs as root.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType

import pytest

SHMEM_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
MEMINFO = Path("/proc/meminfo")


def shmem_thp_mode() -> str:
    """The selected shmem THP mode (the bracketed word of ``shmem_enabled``)."""
    match = re.search(r"\[(\w[\w_]*)\]", SHMEM_ENABLED.read_text())
    if match is None:
        raise RuntimeError(f"cannot parse {SHMEM_ENABLED}: {SHMEM_ENABLED.read_text()!r}")
    return match.group(1)


def meminfo(field: str) -> int:
    """A /proc/meminfo field (kB for sizes, a count for HugePages_*)."""
    for line in MEMINFO.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            return int(rest.split()[0])
    raise KeyError(field)


class HugeSettings:
    """Changes the settings and restores every one it changed, in reverse order."""

    def __init__(self) -> None:
        self._restore: list[tuple[Path, str]] = []

    def _write(self, path: Path, value: str, old: str) -> None:
        try:
            path.write_text(value)
        except OSError as err:
            pytest.skip(f"cannot write {path} ({err.strerror}): huge-page tests need root")
        self._restore.append((path, old))

    def shmem_thp(self, mode: str) -> None:
        """Set shmem THP to ``mode`` (``advise``, ``always``, ...)."""
        if not SHMEM_ENABLED.exists():
            pytest.skip(f"{SHMEM_ENABLED} is absent: no shmem THP in this kernel")
        self._write(SHMEM_ENABLED, mode, shmem_thp_mode())
        if shmem_thp_mode() != mode:
            raise AssertionError(f"{SHMEM_ENABLED} did not take {mode!r}")

    def reserve_hugetlb(self, pages: int) -> None:
        """Make ``pages`` more free 2 MiB hugetlb pages available than there are now."""
        if meminfo("Hugepagesize") != 2048:
            pytest.skip("the default hugetlb page is not 2 MiB")
        old = NR_HUGEPAGES.read_text().strip()
        want = meminfo("HugePages_Free") + pages
        self._write(NR_HUGEPAGES, str(int(old) + pages), old)
        free = meminfo("HugePages_Free")
        if free < want:
            pytest.skip(f"asked for {pages} more hugetlb pages, the kernel found only "
                        f"{free} free (memory too fragmented)")

    def close(self) -> None:
        errors: list[str] = []
        while self._restore:
            path, old = self._restore.pop()
            try:
                path.write_text(old)
            except OSError as err:
                errors.append(f"{path} <- {old!r}: {err}")
        if errors:
            raise RuntimeError("could not restore huge-page settings: " + "; ".join(errors))

    def __enter__(self) -> HugeSettings:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
