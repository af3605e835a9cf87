"""PAGEMAP_SCAN against the running kernel: the ABI, async write protection, partial scans.

Every fact the dirty tracker will rest on is asserted here: writes to async-WP pages reach no
handler but are reported; a re-protecting scan clears exactly what it reported, even when it
stops early; a device process's writes live in its own page tables; a write through the file is
seen by no page table (the hazard the tracker must rule out). Writes to write-protected memory
go through ``memmove`` (a GIL-releasing call) and are resolved by the kernel itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
from collections.abc import Iterator

import numpy as np
import pytest
from uffd_helpers import require, run_in_child

from vmmswap.kernel import pagemap as abi
from vmmswap.kernel.pagemap import KNOWN_CATEGORIES, PageCategory
from vmmswap.kernel.uffd import Feature, RegisterMode
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagemap_scan import REGION_DTYPE, Pagemap, WrittenScan
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd

ASYNC_WP = (Feature.PAGEFAULT_FLAG_WP | Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM
            | Feature.WP_UNPOPULATED)
PAGES = 64

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pagemap() -> Iterator[Pagemap]:
    with Pagemap.open() as pm:
        yield pm


class Tracked:
    """A shmem mapping registered for async write protection and protected as a whole."""

    def __init__(self, pages: int = PAGES, mode: RegisterMode = RegisterMode.WP) -> None:
        require(ASYNC_WP)
        self.mem = Mapping.memfd(pages * PAGE_SIZE)
        self.mem.write(0, b"\x01" * (pages * PAGE_SIZE))  # populated: present in page tables
        self.uffd = Userfaultfd.new(ASYNC_WP)
        self.uffd.register(self.mem.address, self.mem.length, mode)
        self.uffd.write_protect(self.mem.address, self.mem.length)

    def addr(self, page: int) -> int:
        return self.mem.address + page * PAGE_SIZE

    def touch(self, *pages: int) -> None:
        for page in pages:
            self.mem.write(page * PAGE_SIZE + 8, b"\xee")

    def written(self, pm: Pagemap, reprotect: bool = False) -> list[int]:
        dirty = np.zeros(self.mem.length // PAGE_SIZE, dtype=np.bool_)
        WrittenScan(pm, self.mem.address, dirty, reprotect=reprotect).run()
        return np.flatnonzero(dirty).tolist()

    def close(self) -> None:
        self.uffd.close()
        self.mem.close()


@pytest.fixture
def tracked() -> Iterator[Tracked]:
    t = Tracked()
    yield t
    t.close()


# --- the ABI, checked against the kernel ----------------------------------------------------
def _raw_scan(pm: Pagemap, size: int, start: int, end: int, category_mask: int = 0) -> int:
    arg = bytearray(max(size, abi.PM_SCAN_ARG_STRUCT.size))
    abi.PM_SCAN_ARG_STRUCT.pack_into(arg, 0, size, 0, start, end, 0, 0, 0, 0, 0,
                                     category_mask, 0, 0)
    return fcntl.ioctl(pm.fileno(), abi.PAGEMAP_SCAN, arg, True)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                    reason="the number is the x86_64/arm64 _IOC encoding")
def test_request_number_is_iowr_f_16_of_96_bytes() -> None:
    assert abi.PAGEMAP_SCAN == 0xC0606610


def test_the_kernel_accepts_exactly_our_struct_size(pagemap: Pagemap) -> None:
    mem = Mapping.anonymous(PAGE_SIZE)
    assert _raw_scan(pagemap, abi.PM_SCAN_ARG_STRUCT.size, mem.address, mem.end) == 0
    for wrong in (abi.PM_SCAN_ARG_STRUCT.size - 8, abi.PM_SCAN_ARG_STRUCT.size + 8):
        with pytest.raises(OSError) as info:
            _raw_scan(pagemap, wrong, mem.address, mem.end)
        assert info.value.errno == errno.EINVAL


def test_every_known_category_exists_in_the_kernel_and_no_other(pagemap: Pagemap) -> None:
    """The kernel refuses category bits it does not know: ours are all its, and the next bit
    (which this module does not define) is refused, so the check can fail."""
    mem = Mapping.anonymous(PAGE_SIZE)
    for category in PageCategory:
        assert _raw_scan(pagemap, abi.PM_SCAN_ARG_STRUCT.size, mem.address, mem.end,
                         category) == 0, category
    unknown = int(KNOWN_CATEGORIES) + 1  # the lowest bit above the known ones
    assert unknown & ~int(KNOWN_CATEGORIES)
    with pytest.raises(OSError) as info:
        _raw_scan(pagemap, abi.PM_SCAN_ARG_STRUCT.size, mem.address, mem.end, unknown)
    assert info.value.errno == errno.EINVAL


def test_region_dtype_matches_the_struct() -> None:
    record = np.zeros(1, dtype=REGION_DTYPE)
    record[0] = (1, 2, 3)
    assert record.tobytes() == abi.PAGE_REGION_STRUCT.pack(1, 2, 3)


# --- reporting ------------------------------------------------------------------------------
def test_present_pages_are_reported_as_merged_regions(pagemap: Pagemap) -> None:
    mem = Mapping.memfd(16 * PAGE_SIZE)
    for page in (2, 3, 4, 9):
        mem.write(page * PAGE_SIZE, b"x")
    result = pagemap.scan(mem.address, mem.end, Pagemap.regions(),
                          require=PageCategory.PRESENT, report=PageCategory.PRESENT)
    assert result.complete
    got = [((s - mem.address) // PAGE_SIZE, (e - mem.address) // PAGE_SIZE)
           for s, e in zip(result.regions["start"].tolist(), result.regions["end"].tolist(),
                           strict=True)]
    assert got == [(2, 5), (9, 10)]
    assert set(result.regions["categories"].tolist()) == {int(PageCategory.PRESENT)}


def test_async_wp_writes_reach_no_handler_and_are_reported(pagemap: Pagemap,
                                                           tracked: Tracked) -> None:
    assert tracked.written(pagemap) == []
    tracked.touch(3, 7, 8, 9, 40)
    assert tracked.uffd.read_events() == []  # the kernel resolved the faults itself
    assert tracked.written(pagemap) == [3, 7, 8, 9, 40]
    # Reporting alone does not protect: the same pages again (the control for the next step).
    assert tracked.written(pagemap) == [3, 7, 8, 9, 40]
    assert tracked.written(pagemap, reprotect=True) == [3, 7, 8, 9, 40]
    assert tracked.written(pagemap) == []
    tracked.touch(8)
    assert tracked.written(pagemap) == [8]


def test_unregistered_memory_reads_as_written(pagemap: Pagemap) -> None:
    """Outside an async-WP range every page counts as written: a tracker errs towards copying."""
    mem = Mapping.memfd(4 * PAGE_SIZE)
    dirty = np.zeros(4, dtype=np.bool_)
    WrittenScan(pagemap, mem.address, dirty, reprotect=False).run()
    assert dirty.all()
    with pytest.raises(PermissionError):
        pagemap.scan(mem.address, mem.end, Pagemap.regions(), require=PageCategory.WRITTEN,
                     write_protect=True, check_wp_async=True)


def test_registration_starts_written_until_protected(pagemap: Pagemap) -> None:
    require(ASYNC_WP)
    mem = Mapping.memfd(4 * PAGE_SIZE)
    uffd = Userfaultfd.new(ASYNC_WP)
    uffd.register(mem.address, mem.length, RegisterMode.WP)
    result = pagemap.scan(mem.address, mem.end, Pagemap.regions(),
                          report=PageCategory.WPALLOWED | PageCategory.WRITTEN)
    assert result.regions["categories"].tolist() == [
        int(PageCategory.WPALLOWED | PageCategory.WRITTEN)]
    uffd.write_protect(mem.address, mem.length)
    result = pagemap.scan(mem.address, mem.end, Pagemap.regions(),
                          report=PageCategory.WPALLOWED | PageCategory.WRITTEN)
    assert result.regions["categories"].tolist() == [int(PageCategory.WPALLOWED)]
    uffd.close()


# --- partial scans ----------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["regions", "max_pages"])
def test_a_partial_scan_reprotects_only_what_it_reported(pagemap: Pagemap, tracked: Tracked,
                                                         limit: str) -> None:
    tracked.touch(3, 7, 8, 9, 20, 30, 40)
    out = Pagemap.regions(2 if limit == "regions" else 16)
    result = pagemap.scan(tracked.addr(0), tracked.mem.end, out, require=PageCategory.WRITTEN,
                          report=PageCategory.WRITTEN, write_protect=True,
                          max_pages=3 if limit == "max_pages" else 0)
    assert not result.complete
    reported = sum((e - s) // PAGE_SIZE for s, e in
                   zip(result.regions["start"].tolist(), result.regions["end"].tolist(),
                       strict=True))
    assert reported == (4 if limit == "regions" else 3)
    # What the walk did not report is still written; what it did is clean.
    left = [3, 7, 8, 9, 20, 30, 40][reported:]
    assert tracked.written(pagemap) == left


def test_max_pages_can_split_a_region_and_the_rest_stays_written(pagemap: Pagemap,
                                                                 tracked: Tracked) -> None:
    tracked.touch(10, 11, 12, 13)
    result = pagemap.scan(tracked.addr(0), tracked.mem.end, Pagemap.regions(),
                          require=PageCategory.WRITTEN, report=PageCategory.WRITTEN,
                          write_protect=True, max_pages=2)
    assert result.walk_end == tracked.addr(12)
    assert tracked.written(pagemap) == [12, 13]


def test_written_scan_in_small_steps_finds_what_one_scan_finds(pagemap: Pagemap,
                                                               tracked: Tracked) -> None:
    rng = np.random.default_rng(7)
    pages = sorted(set(rng.integers(0, PAGES, 25).tolist()))
    tracked.touch(*pages)
    dirty = np.zeros(PAGES, dtype=np.bool_)
    scan = WrittenScan(pagemap, tracked.addr(0), dirty, reprotect=True, regions=1)
    steps = 0
    while not scan.done:
        scan.step(max_pages=2)
        steps += 1
    assert steps > 3  # it really was resumed from its cursor
    assert np.flatnonzero(dirty).tolist() == pages
    assert scan.found == len(pages)
    assert tracked.written(pagemap) == []


# --- who sees a write -------------------------------------------------------------------------
def test_a_write_through_the_file_is_seen_by_no_page_table(pagemap: Pagemap,
                                                           tracked: Tracked) -> None:
    """The hazard: pwrite into guest memory changes data no scan reports. The tracker must
    forbid it (balloon and device paths write through mappings)."""
    os.pwrite(tracked.mem.fd or -1, b"z", 5 * PAGE_SIZE)
    assert tracked.written(pagemap) == []
    assert tracked.mem.read(5 * PAGE_SIZE, 1) == b"z"  # yet the data changed


def test_a_device_process_write_lives_in_its_own_page_tables(pagemap: Pagemap,
                                                             tracked: Tracked) -> None:
    """A child maps the same memfd, tracks it with its own uffd and writes page 5: only the
    child's pagemap reports it, so every process mapping guest memory must be scanned."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the device process
        try:
            os.close(r)
            os.close(go_w)
            fd = tracked.mem.fd
            assert fd is not None
            mine = Mapping.map_fd(fd, tracked.mem.length)
            uffd = Userfaultfd.new(ASYNC_WP)
            uffd.register(mine.address, mine.length, RegisterMode.WP)
            uffd.write_protect(mine.address, mine.length)
            os.write(w, mine.address.to_bytes(8, "little"))
            os.read(go_r, 1)
            mine.write(5 * PAGE_SIZE, b"d")
            os.write(w, b"w")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    try:
        child_base = int.from_bytes(os.read(r, 8), "little")
        with Pagemap.open(pid) as child:
            dirty = np.zeros(PAGES, dtype=np.bool_)
            WrittenScan(child, child_base, dirty, reprotect=False).run()
            assert not dirty.any()
            os.write(go_w, b"g")
            assert os.read(r, 1) == b"w"
            WrittenScan(child, child_base, dirty, reprotect=False).run()
            assert np.flatnonzero(dirty).tolist() == [5]
        assert tracked.written(pagemap) == []  # the VMM's own page tables know nothing
        assert tracked.mem.read(5 * PAGE_SIZE, 1) == b"d"
        os.write(go_w, b"g")
    finally:
        os.close(r)
        os.close(go_w)
        os.waitpid(pid, 0)


def test_copy_mode_wp_fills_clean_and_plain_copy_fills_written(pagemap: Pagemap) -> None:
    """Swap-in can fill with COPY_MODE_WP, so protecting a filled page costs nothing."""
    require(ASYNC_WP)

    def fill() -> list[int]:
        mem = Mapping.memfd(4 * PAGE_SIZE)
        uffd = Userfaultfd.new(ASYNC_WP)
        uffd.register(mem.address, mem.length, RegisterMode.MISSING | RegisterMode.WP)
        uffd.write_protect(mem.address, mem.length)
        page = b"\x5a" * PAGE_SIZE
        uffd.copy(mem.address, PAGE_SIZE, page, write_protect=True)
        uffd.copy(mem.address + 2 * PAGE_SIZE, PAGE_SIZE, page)
        dirty = np.zeros(4, dtype=np.bool_)
        with Pagemap.open() as pm:
            WrittenScan(pm, mem.address, dirty, reprotect=False).run()
        assert mem.read(0, 1) == b"\x5a"  # present now: reading faults on nothing
        return np.flatnonzero(dirty).tolist()

    assert run_in_child(fill) == [2]


# --- bad input and a gone process --------------------------------------------------------------
def test_bad_arguments_are_refused_and_change_nothing(pagemap: Pagemap,
                                                      tracked: Tracked) -> None:
    tracked.touch(4)
    out = Pagemap.regions()
    base = tracked.addr(0)
    for kwargs, match in [
        ({"start": base + 1, "end": tracked.mem.end}, "aligned"),
        ({"start": tracked.mem.end, "end": base}, "inverted"),
        ({"start": base, "end": tracked.mem.end, "require": 1 << 30}, "unknown"),
        ({"start": base, "end": tracked.mem.end, "max_pages": -1}, "max_pages"),
    ]:
        start, end = kwargs.pop("start"), kwargs.pop("end")
        with pytest.raises(ValueError, match=match):
            pagemap.scan(start, end, out, write_protect=True, **kwargs)
    with pytest.raises(ValueError, match=r"Pagemap\.regions"):
        pagemap.scan(base, tracked.mem.end, np.zeros(4, dtype=np.uint64), write_protect=True)
    with pytest.raises(ValueError, match="one slot per page"):
        WrittenScan(pagemap, base, np.zeros(4, dtype=np.uint8), reprotect=True)
    with pytest.raises(ValueError):
        Pagemap.regions(0)
    assert tracked.written(pagemap) == [4]  # nothing was protected by the refused calls
    pagemap.close()
    with pytest.raises(ValueError, match="closed"):
        pagemap.scan(base, tracked.mem.end, out)


def test_a_gone_process_is_a_process_lookup_error() -> None:
    hold, release = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - lives until the parent has its pagemap open
        os.close(release)
        os.read(hold, 1)
        os._exit(0)
    os.close(hold)
    try:
        pm = Pagemap.open(pid)
    finally:
        os.close(release)  # the child exits now (was a race: it could exit before the open)
    os.waitpid(pid, 0)
    mem = Mapping.anonymous(PAGE_SIZE)
    with pytest.raises(ProcessLookupError, match="exited"):
        pm.scan(mem.address, mem.end, Pagemap.regions())
    pm.close()
    with pytest.raises(ProcessLookupError, match="gone"):
        Pagemap.open(pid)


def test_the_pagemap_descriptor_is_close_on_exec(pagemap: Pagemap) -> None:
    assert fcntl.fcntl(pagemap.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
