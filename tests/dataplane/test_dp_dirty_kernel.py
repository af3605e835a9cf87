"""What dirty tracking relies on, asked of the running kernel (see vmmswap.dataplane.dirty).

Two mappings of one shmem memfd stand for two processes' page tables (the VMM's and a
device's): the kernel keeps the written state per page-table entry, so a write through one is
seen in that one only. Every page touched here already holds data in the memfd and the uffd
has no REMOVE events, so no access waits for a handler (the GIL rule); the test still runs
under a hard timeout.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest

from huge_settings import HugeSettings
from vmmswap.dataplane.dirty import DIRTY_TRACKING_FEATURES, probe_tracking, scan_process
from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.dataplane.page_store import Region
from vmmswap.kernel import libc
from vmmswap.kernel.pagemap import PageCategory
from vmmswap.kernel.uffd import Feature, RegisterMode
from vmmswap.uffd.pagemap_scan import Pagemap
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(not probe_tracking().available,
                                 reason=f"no dirty tracking: {probe_tracking().reason}")]

N = 16
HUGE = 2 << 20
MFD_HUGE_2MB = 21 << 26
_madvise = ctypes.CDLL(None, use_errno=True).madvise


class Two:
    """One memfd, filled, mapped twice (``a`` and ``b``), both registered MISSING | WP on one
    async-WP uffd; ``huge``: a 2 MiB hugetlbfs memfd (filled through ``a`` before the
    registration: hugetlbfs has no write(2))."""

    def __init__(self, wp_features: bool = True, huge: bool = False) -> None:
        self.ps = ps = HUGE if huge else PAGE_SIZE
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB | MFD_HUGE_2MB if huge else 0)
        self.fd = os.memfd_create("dirty kernel test", flags)
        os.ftruncate(self.fd, N * ps)
        self.maps = [mmap.mmap(self.fd, N * ps) for _ in range(2)]
        self.a, self.b = (np.frombuffer(m, dtype=np.uint8).ctypes.data for m in self.maps)
        for i in range(N):
            ctypes.memset(self.a + i * ps, i + 1, ps)
        features = (Feature.MISSING_HUGETLBFS if huge else Feature.MISSING_SHMEM) | (
            DIRTY_TRACKING_FEATURES if wp_features else 0)
        self.uffd = Userfaultfd.new(features)
        mode = RegisterMode.MISSING | (RegisterMode.WP if wp_features else 0)
        for base in (self.a, self.b):
            self.uffd.register(base, N * ps, mode)
        self.pagemap = Pagemap.open()
        self.out = Pagemap.regions(N)

    def regions(self, base: int) -> list[Region]:
        return [Region(RegionSpec(0, base, N * self.ps), self.fd, 0, self.ps)]

    def scan(self, base: int) -> list[int]:
        """scan_process over the mapping at ``base``: the pages it counts as written."""
        written = np.zeros(N, dtype=np.bool_)
        assert scan_process(self.pagemap, self.regions(base), written, self.uffd.write_protect)
        return np.flatnonzero(written).tolist()

    def written(self, base: int) -> set[int]:
        """Pages of the mapping at ``base`` that PAGEMAP_SCAN reports written."""
        result = self.pagemap.scan(base, base + N * PAGE_SIZE, self.out,
                                   require=PageCategory.WRITTEN, report=PageCategory.WRITTEN)
        return {p for s, e in zip(result.regions["start"].tolist(),
                                  result.regions["end"].tolist(), strict=True)
                for p in range((s - base) // PAGE_SIZE, (e - base) // PAGE_SIZE)}

    def protect(self) -> None:
        for base in (self.a, self.b):
            self.uffd.write_protect(base, N * PAGE_SIZE)

    def poke(self, base: int, page: int) -> None:
        ctypes.memmove(base + page * self.ps, b"w", 1)  # releases the GIL

    def peek(self, base: int, page: int) -> None:
        ctypes.string_at(base + page * self.ps, 1)

    def close(self) -> None:
        self.pagemap.close()
        self.uffd.close()
        for m in self.maps:
            m.close()
        os.close(self.fd)


@pytest.fixture
def two() -> Iterator[Two]:
    t = Two()
    yield t
    t.close()


def test_never_protected_pages_count_as_written(two: Two) -> None:
    """Registration alone protects nothing: a scan before the first protection says every
    page was written, which is what makes a newly registered process safe."""
    assert two.written(two.a) == set(range(N))


def test_writes_are_seen_in_the_writing_mapping_only(two: Two) -> None:
    two.protect()
    assert two.written(two.a) == set() and two.written(two.b) == set()
    two.peek(two.a, 0)  # a read maps the page write-protected: not written
    two.poke(two.a, 1)
    two.poke(two.b, 2)
    assert two.written(two.a) == {1}
    assert two.written(two.b) == {2}


def test_a_zapped_written_entry_still_counts_as_written(two: Two) -> None:
    """MADV_DONTNEED drops the entry of a written page (the data stays in the memfd): the
    scan must not forget that it was written."""
    two.protect()
    two.poke(two.a, 5)
    assert _madvise(ctypes.c_void_p(two.a + 5 * PAGE_SIZE), PAGE_SIZE, 4) == 0  # DONTNEED
    assert 5 in two.written(two.a)


def test_protection_survives_a_punch_and_a_protected_copy(two: Two) -> None:
    """A hole punched under protected entries keeps them protected (markers), and a COPY
    with MODE_WP into the hole maps the page protected: a later read elsewhere is no write."""
    two.protect()
    libc.fallocate(two.fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE,
                   3 * PAGE_SIZE, PAGE_SIZE)
    assert two.written(two.a) == set() and two.written(two.b) == set()
    page = ctypes.create_string_buffer(b"Q" * PAGE_SIZE, PAGE_SIZE)
    two.uffd.copy(two.a + 3 * PAGE_SIZE, PAGE_SIZE, ctypes.addressof(page),
                  write_protect=True)
    two.peek(two.b, 3)
    assert two.written(two.a) == set() and two.written(two.b) == set()
    two.poke(two.b, 3)
    assert two.written(two.b) == {3}


def test_a_write_through_the_file_is_seen_by_no_scan(two: Two) -> None:
    """Why nothing may pwrite guest memory while tracking: no page table records it."""
    two.protect()
    os.pwrite(two.fd, b"z" * PAGE_SIZE, 4 * PAGE_SIZE)
    assert two.written(two.a) == set() and two.written(two.b) == set()


def test_scan_with_reprotect_sees_each_write_once(two: Two) -> None:
    two.protect()
    two.poke(two.a, 7)
    regions = [Region(RegionSpec(0, two.a, N * PAGE_SIZE), two.fd, 0)]
    written = np.zeros(N, dtype=np.bool_)
    assert scan_process(two.pagemap, regions, written)
    assert np.flatnonzero(written).tolist() == [7]
    again = np.zeros(N, dtype=np.bool_)
    assert scan_process(two.pagemap, regions, again)
    assert not again.any()


def test_scan_of_an_unprotectable_mapping_is_not_trusted() -> None:
    """PAGEMAP_SCAN skips a mapping without async WP silently; scan_process must notice."""
    t = Two(wp_features=False)
    try:
        t.poke(t.a, 1)
        regions = [Region(RegionSpec(0, t.a, N * PAGE_SIZE), t.fd, 0)]
        written = np.zeros(N, dtype=np.bool_)
        assert not scan_process(t.pagemap, regions, written)
    finally:
        t.close()


def test_scan_of_an_unmapped_range_is_not_trusted(two: Two) -> None:
    """A process that exited or unmapped guest memory reports nothing: not trusted either."""
    two.protect()
    spare = mmap.mmap(-1, N * PAGE_SIZE)
    base = np.frombuffer(spare, dtype=np.uint8).ctypes.data
    spare.close()  # nothing is mapped at base now
    regions = [Region(RegionSpec(0, base, N * PAGE_SIZE), two.fd, 0)]
    assert not scan_process(two.pagemap, regions, np.zeros(N, dtype=np.bool_))


@pytest.fixture
def huge(huge_settings: HugeSettings) -> Iterator[Two]:
    huge_settings.reserve_hugetlb(N)
    t = Two(huge=True)
    yield t
    t.close()


def test_hugetlb_writes_are_seen_per_mapping_and_whole(huge: Two) -> None:
    """On hugetlbfs a never-touched (empty) entry reads as not written; scan_process counts it
    written and protects the region, after which only real writes show, a huge page whole."""
    assert huge.scan(huge.b) == list(range(N))  # b never touched: empty entries
    assert huge.scan(huge.a) == list(range(N))  # a touched by the fill: written
    assert huge.scan(huge.a) == [] and huge.scan(huge.b) == []
    huge.peek(huge.b, 1)
    huge.poke(huge.b, 2)
    ctypes.memmove(huge.a + 5 * HUGE + 12345, b"w", 1)  # anywhere in the huge page
    assert huge.scan(huge.a) == [5]
    assert huge.scan(huge.b) == [2]


def test_hugetlb_a_zapped_written_entry_still_counts_as_written(huge: Two) -> None:
    huge.scan(huge.a)
    huge.poke(huge.a, 3)
    assert _madvise(ctypes.c_void_p(huge.a + 3 * HUGE), HUGE, 4) == 0  # DONTNEED
    assert huge.scan(huge.a) == [3]  # empty now: counted written, not lost


def test_hugetlb_scan_needs_a_way_to_protect(huge: Two) -> None:
    with pytest.raises(ValueError, match="needs protect"):
        scan_process(huge.pagemap, huge.regions(huge.a), np.zeros(N, dtype=np.bool_))
