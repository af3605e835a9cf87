"""The fill ioctls without faults: zeropage (selftest ``zeropage``), the seed's COPY claims,
partial results, MOVE, CONTINUE and COPY's write-protect mode.

Nothing here waits for a fault: memory is only read once it is populated (checked in pagemap).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pytest
from uffd_helpers import Area, is_present, make_area, pagemap_entry, read_present, require

from vmmswap.kernel import libc
from vmmswap.kernel.uffd import PM_UFFD_WP, Feature, Ioctls, RegisterMode
from vmmswap.uffd.errors import (
    PageExistsError,
    PartialCopyError,
    PartialFillError,
    UffdFillError,
)
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, pages_to_bytes
from vmmswap.uffd.userfaultfd import Userfaultfd

FEATURES = Feature.MISSING_SHMEM | Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM \
    | Feature.MINOR_SHMEM
KINDS = ["anon", "shmem", "shmem-private"]


@pytest.fixture
def uffd() -> Iterator[Userfaultfd]:
    with Userfaultfd.new(FEATURES) as u:
        yield u


@pytest.fixture(params=KINDS)
def area(request: pytest.FixtureRequest) -> Iterator[Area]:
    a = make_area(request.param, 4)
    yield a
    a.close()


def page_of(value: int) -> bytes:
    return bytes([value]) * PAGE_SIZE


def test_zeropage(uffd: Userfaultfd, area: Area) -> None:
    """Port of ``zeropage``: fill, the data is zero, a retry (through the alias) is EEXIST."""
    ioctls = uffd.register(area.address, PAGE_SIZE)
    assert Ioctls.ZEROPAGE in ioctls  # only hugetlb lacks it
    if area.alias is not None:
        uffd.register(area.alias.address, PAGE_SIZE)
    assert uffd.zero(area.address, PAGE_SIZE) == PAGE_SIZE
    assert read_present(area.address, PAGE_SIZE) == bytes(PAGE_SIZE)
    retry_at = area.alias.address if area.alias is not None else area.address
    with pytest.raises(PageExistsError) as info:
        uffd.zero(retry_at, PAGE_SIZE)
    assert info.value.result == -errno.EEXIST
    uffd.unregister(area.address, PAGE_SIZE)
    if area.alias is not None:
        uffd.unregister(area.alias.address, PAGE_SIZE)


def test_copy_onto_a_populated_page_is_eexist(uffd: Userfaultfd, area: Area) -> None:
    """The seed's claim: the fills never overwrite; a page with data gives EEXIST."""
    area.mapping.write(0, page_of(7))  # populated before registering: no fault
    uffd.register(area.address, area.length)
    with pytest.raises(PageExistsError) as info:
        uffd.copy(area.address, PAGE_SIZE, page_of(9))
    assert isinstance(info.value, FileExistsError)
    assert info.value.errno == errno.EEXIST
    assert info.value.result == -errno.EEXIST
    assert read_present(area.address, PAGE_SIZE) == page_of(7)
    with pytest.raises(PageExistsError):
        uffd.zero(area.address, PAGE_SIZE)
    assert read_present(area.address, PAGE_SIZE) == page_of(7)


def test_partial_copy_reports_the_bytes_done(uffd: Userfaultfd, area: Area) -> None:
    """A 3-page COPY whose 3rd page exists: EAGAIN with 2 pages done (measured on 6.18)."""
    area.mapping.write(pages_to_bytes(2), page_of(1))
    uffd.register(area.address, area.length)
    src = page_of(5) * 3
    with pytest.raises(PartialFillError) as info:
        uffd.copy(area.address, pages_to_bytes(3), src)
    err = info.value
    assert isinstance(err, PartialCopyError) and isinstance(err, BlockingIOError)
    assert err.errno == errno.EAGAIN
    assert err.bytes_done == err.characters_written == err.result == pages_to_bytes(2)
    assert read_present(area.address, pages_to_bytes(3)) == page_of(5) * 2 + page_of(1)


def test_copy_all_stops_at_an_existing_page_with_the_total(uffd: Userfaultfd, area: Area) -> None:
    area.mapping.write(pages_to_bytes(2), page_of(1))
    uffd.register(area.address, area.length)
    with pytest.raises(PageExistsError) as info:
        uffd.copy_all(area.address, pages_to_bytes(4), page_of(3) * 4)
    assert info.value.bytes_done == pages_to_bytes(2)
    assert not is_present(area.page(3))
    assert uffd.copy_all(area.page(3), PAGE_SIZE, page_of(4)) == PAGE_SIZE
    assert read_present(area.address, area.length) == page_of(3) * 2 + page_of(1) + page_of(4)


def test_copy_all_continues_through_partial_results(area: Area) -> None:
    """The helper's loop, with the kernel's partial result simulated once per call."""

    class Flaky(Userfaultfd):
        calls: ClassVar[list[tuple[int, int, int]]] = []

        def copy(self, addr: int, length: int, src: object, wake: bool = True,
                 write_protect: bool = False) -> int:
            self.calls.append((addr, length, src))  # type: ignore[arg-type]
            if length > PAGE_SIZE:
                done = super().copy(addr, PAGE_SIZE, src, wake, write_protect)  # type: ignore[arg-type]
                err = PartialFillError(errno.EAGAIN, "partial")
                err.bytes_done = done
                raise err
            return super().copy(addr, length, src, wake, write_protect)  # type: ignore[arg-type]

    base = Userfaultfd.new(FEATURES)
    uffd = Flaky(base.detach(), FEATURES)
    with uffd:
        uffd.register(area.address, area.length)
        assert uffd.copy_all(area.address, area.length, page_of(6) * 4) == area.length
        assert [c[1] for c in Flaky.calls] == [pages_to_bytes(n) for n in (4, 3, 2, 1)]
        assert read_present(area.address, area.length) == page_of(6) * 4


def test_a_removed_page_can_be_filled_again(uffd: Userfaultfd, area: Area) -> None:
    """The seed's second kind of uninitialised page: never touched since MADV_REMOVE."""
    uffd.register(area.address, area.length)
    uffd.copy(area.address, PAGE_SIZE, page_of(1))
    assert read_present(area.address, PAGE_SIZE) == page_of(1)
    advice = libc.MADV_REMOVE if area.kind == "shmem" else libc.MADV_DONTNEED
    area.mapping.madvise(advice, 0, PAGE_SIZE)
    assert not is_present(area.address)
    uffd.copy(area.address, PAGE_SIZE, page_of(2))
    assert read_present(area.address, PAGE_SIZE) == page_of(2)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "readonly-view",
                                  "ctypes", "address", "numpy-int"])
def test_copy_sources(uffd: Userfaultfd, kind: str) -> None:
    data = page_of(0x5A)
    keep = ctypes.create_string_buffer(data, PAGE_SIZE)
    src: object = {
        "bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(bytearray(data)),
        "readonly-view": memoryview(data), "ctypes": keep, "address": ctypes.addressof(keep),
        "numpy-int": np.uint64(ctypes.addressof(keep)),
    }[kind]
    with Mapping.anonymous(PAGE_SIZE) as dst:
        uffd.register(dst.address, PAGE_SIZE)
        assert uffd.copy(dst.address, PAGE_SIZE, src) == PAGE_SIZE  # type: ignore[arg-type]
        assert read_present(dst.address, PAGE_SIZE) == data


def test_a_short_source_buffer_is_refused_and_changes_nothing(uffd: Userfaultfd) -> None:
    with Mapping.anonymous(pages_to_bytes(2)) as dst:
        uffd.register(dst.address, dst.length)
        with pytest.raises(ValueError, match="fewer than"):
            uffd.copy(dst.address, dst.length, page_of(1))
        with pytest.raises(ValueError, match="fewer than"):
            uffd.copy_all(dst.address, dst.length, page_of(1))
        assert not is_present(dst.address)


def test_bad_ranges_name_the_cause(uffd: Userfaultfd, area: Area) -> None:
    uffd.register(area.address, area.length)
    with pytest.raises(OSError, match="not aligned") as info:
        uffd.copy(area.address + 8, PAGE_SIZE, page_of(1))
    assert info.value.errno == errno.EINVAL and not isinstance(info.value, UffdFillError)
    with pytest.raises(OSError, match="length is 0"):
        uffd.zero(area.address, 0)
    outside = Mapping.anonymous(PAGE_SIZE)
    with pytest.raises(OSError, match="not registered") as not_registered:
        uffd.zero(outside.address, PAGE_SIZE)
    assert not_registered.value.errno == errno.ENOENT  # 6.18; EINVAL on older kernels
    outside.close()
    with pytest.raises(ValueError, match="integers"):
        uffd.copy(area.address, -1, 0)


def test_wake_without_waiters_is_a_no_op(uffd: Userfaultfd, area: Area) -> None:
    uffd.register(area.address, area.length)
    uffd.wake(area.address, area.length)
    with pytest.raises(OSError) as info:
        uffd.wake(area.address + 1, PAGE_SIZE)
    assert info.value.errno == errno.EINVAL


def test_dontwake_fills(uffd: Userfaultfd, area: Area) -> None:
    uffd.register(area.address, area.length)
    assert uffd.copy(area.address, PAGE_SIZE, page_of(1), wake=False) == PAGE_SIZE
    assert uffd.zero(area.page(1), PAGE_SIZE, wake=False) == PAGE_SIZE
    uffd.wake(area.address, pages_to_bytes(2))
    assert read_present(area.address, pages_to_bytes(2)) == page_of(1) + bytes(PAGE_SIZE)


def test_copy_write_protect_mode(uffd: Userfaultfd) -> None:
    require(Feature.PAGEFAULT_FLAG_WP)
    with Mapping.anonymous(PAGE_SIZE) as dst:
        ioctls = uffd.register(dst.address, PAGE_SIZE, RegisterMode.MISSING | RegisterMode.WP)
        assert Ioctls.WRITEPROTECT in ioctls
        uffd.copy(dst.address, PAGE_SIZE, page_of(3), write_protect=True)
        assert pagemap_entry(dst.address) & PM_UFFD_WP
        uffd.write_unprotect(dst.address, PAGE_SIZE)
        assert not pagemap_entry(dst.address) & PM_UFFD_WP
        uffd.write_protect(dst.address, PAGE_SIZE)
        assert pagemap_entry(dst.address) & PM_UFFD_WP
        uffd.write_unprotect(dst.address, PAGE_SIZE, wake=False)
        assert read_present(dst.address, PAGE_SIZE) == page_of(3)


def test_write_protect_needs_a_wp_registration(uffd: Userfaultfd) -> None:
    with Mapping.anonymous(PAGE_SIZE) as dst:
        uffd.register(dst.address, PAGE_SIZE)
        with pytest.raises(OSError) as info:
            uffd.write_protect(dst.address, PAGE_SIZE)
        assert info.value.errno in (errno.ENOENT, errno.EINVAL)


def test_move_within_this_process() -> None:
    """MOVE takes pages from a private source: dst gets them, src becomes a hole."""
    require(Feature.MOVE)
    with Userfaultfd.new(Feature.MOVE) as uffd, Mapping.anonymous(pages_to_bytes(2)) as src, \
            Mapping.anonymous(pages_to_bytes(2)) as dst:
        src.write(0, page_of(8) + page_of(9))
        ioctls = uffd.register(dst.address, dst.length)
        assert Ioctls.MOVE in ioctls
        assert uffd.move(dst.address, src.address, PAGE_SIZE) == PAGE_SIZE
        assert read_present(dst.address, PAGE_SIZE) == page_of(8)
        assert not is_present(src.address)
        with pytest.raises(PageExistsError):
            uffd.move(dst.address, src.address + PAGE_SIZE, PAGE_SIZE)
        with pytest.raises(FileNotFoundError, match="holes"):
            uffd.move(dst.address + PAGE_SIZE, src.address, PAGE_SIZE)
        assert uffd.move(dst.address + PAGE_SIZE, src.address, PAGE_SIZE,
                         allow_src_holes=True) == PAGE_SIZE
        # A hole was "moved": dst stays missing.
        assert not is_present(dst.address + PAGE_SIZE)


def test_continue_maps_the_page_cache_page(uffd: Userfaultfd) -> None:
    require(Feature.MINOR_SHMEM)
    area = make_area("shmem", 2)
    try:
        assert area.alias is not None
        area.alias.write(0, page_of(0x33))  # page cache populated through the other mapping
        ioctls = uffd.register(area.address, area.length, RegisterMode.MINOR)
        assert Ioctls.CONTINUE in ioctls
        assert uffd.continue_(area.address, PAGE_SIZE) == PAGE_SIZE
        assert read_present(area.address, PAGE_SIZE) == page_of(0x33)
        with pytest.raises(PageExistsError):
            uffd.continue_(area.address, PAGE_SIZE)
        with pytest.raises(OSError, match="page cache") as info:
            uffd.continue_(area.page(1), PAGE_SIZE)  # nothing in the page cache there
        assert info.value.errno == errno.EFAULT
    finally:
        area.close()


def test_poison_marks_missing_pages() -> None:
    require(Feature.POISON)
    with Userfaultfd.new(Feature.POISON) as u, Mapping.anonymous(pages_to_bytes(2)) as dst:
        ioctls = u.register(dst.address, dst.length)
        assert Ioctls.POISON in ioctls
        assert u.poison(dst.address, PAGE_SIZE) == PAGE_SIZE
        with pytest.raises(PageExistsError):
            u.poison(dst.address, PAGE_SIZE)
        # A poison marker is not a page: COPY replaces it (a way to "unpoison").
        assert u.copy(dst.address, PAGE_SIZE, page_of(1)) == PAGE_SIZE
        assert read_present(dst.address, PAGE_SIZE) == page_of(1)
