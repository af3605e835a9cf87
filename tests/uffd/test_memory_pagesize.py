"""The lead's page math and mappings, as the userfaultfd layer relies on them."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import libc
from vmmswap.uffd import pagesize
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, THP_SIZE


def test_page_constants() -> None:
    assert PAGE_SIZE == mmap.PAGESIZE
    assert 1 << pagesize.PAGE_SHIFT == PAGE_SIZE
    assert THP_SIZE % PAGE_SIZE == 0 and THP_SIZE & (THP_SIZE - 1) == 0
    path = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
    if os.path.exists(path):
        with open(path) as f:
            assert int(f.read()) == THP_SIZE


@given(st.integers(0, 2**48))
def test_conversions(n: int) -> None:
    assert pagesize.bytes_to_pages(pagesize.pages_to_bytes(n)) == n
    assert pagesize.bytes_to_pages(n) == n // PAGE_SIZE
    assert pagesize.bytes_to_pages_round_up(n) == -(-n // PAGE_SIZE)
    assert pagesize.page_base(n) == n - n % PAGE_SIZE
    assert pagesize.page_round_up(n) == -(-n // PAGE_SIZE) * PAGE_SIZE
    assert pagesize.is_page_aligned(n) == (n % PAGE_SIZE == 0)
    assert pagesize.is_hugepage_aligned(n) == (n % THP_SIZE == 0)
    assert pagesize.hugepage_round_up(n) == -(-n // THP_SIZE) * THP_SIZE
    assert pagesize.hugepage_round_down(n) == n - n % THP_SIZE
    assert pagesize.page_idx_to_addr(pagesize.addr_to_page_idx(n)) == pagesize.page_base(n)


def test_check_page_range() -> None:
    pagesize.check_page_range(PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(ValueError, match="positive"):
        pagesize.check_page_range(0, 0)
    with pytest.raises(ValueError, match="aligned"):
        pagesize.check_page_range(1, PAGE_SIZE)


def test_anonymous_mapping() -> None:
    with Mapping.anonymous(PAGE_SIZE + 1) as m:
        assert m.length == 2 * PAGE_SIZE  # rounded up to whole pages
        assert m.address % PAGE_SIZE == 0 and m.end == m.address + m.length
        m.write(10, b"hello")
        assert m.read(10, 5) == b"hello"
        buf = bytearray(3)
        m.read_into(11, buf)
        assert buf == b"ell"
        assert "anonymous" in repr(m)
        with pytest.raises(ValueError, match="outside"):
            m.read(m.length - 1, 2)
        m.madvise(libc.MADV_DONTNEED, 0, PAGE_SIZE)
        assert m.read(10, 5) == bytes(5)  # private anonymous: dropped pages read as zeros
        with pytest.raises(ValueError, match="aligned"):
            m.madvise(libc.MADV_DONTNEED, 1, PAGE_SIZE)
    assert m.closed and "closed" in repr(m)
    m.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        m.read(0, 1)


def test_memfd_mapping_is_shared_and_removable() -> None:
    with Mapping.memfd(2 * PAGE_SIZE, "test") as m:
        assert m.fd is not None and m.shared
        with Mapping.map_fd(m.fd, m.length) as alias:  # the guest-memory layout: an alias
            m.write(PAGE_SIZE, b"shared")
            assert alias.read(PAGE_SIZE, 6) == b"shared"
            m.madvise(libc.MADV_REMOVE, PAGE_SIZE, PAGE_SIZE)  # punches the page cache
            assert alias.read(PAGE_SIZE, 6) == bytes(6)
        fd = m.fd
    with pytest.raises(OSError):
        os.fstat(fd)  # the memfd is closed with its mapping


def test_private_mapping_of_a_memfd_does_not_write_through() -> None:
    with Mapping.memfd(PAGE_SIZE) as m:
        assert m.fd is not None
        with Mapping.map_fd(m.fd, PAGE_SIZE, shared=False) as private:
            private.write(0, b"x")
            assert m.read(0, 1) == b"\x00"


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping holding ``address``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_huge_page_advice() -> None:
    """The advice reaches the kernel: the range's VMA carries ``hg``, then ``nh``."""
    with Mapping.anonymous(2 * THP_SIZE) as m:
        start = pagesize.hugepage_round_up(m.address) - m.address
        try:
            m.madvise(libc.MADV_HUGEPAGE, start, THP_SIZE)
        except OSError as err:
            pytest.skip(f"no transparent huge pages: {err}")
        assert "hg" in _vm_flags(m.address + start)
        m.madvise(libc.MADV_NOHUGEPAGE, start, THP_SIZE)
        flags = _vm_flags(m.address + start)
        assert "nh" in flags and "hg" not in flags


def test_reserve_is_inaccessible_placeholder() -> None:
    with Mapping.reserve(PAGE_SIZE) as r:
        assert r.length == PAGE_SIZE


def test_guest_memory_discard_drops_pages_and_refuses_bad_ranges() -> None:
    with GuestMemory.create([(0, 4 * PAGE_SIZE), (1 << 30, 2 * PAGE_SIZE)]) as memory:
        memory.write(0, b"\x5a" * (4 * PAGE_SIZE))
        for addr, length in ((1, PAGE_SIZE), (0, 100), (0, 0), (3 * PAGE_SIZE, 2 * PAGE_SIZE),
                             (8 * PAGE_SIZE, PAGE_SIZE)):
            with pytest.raises(ValueError):
                memory.discard(addr, length)
        assert memory.read(0, 4 * PAGE_SIZE) == b"\x5a" * (4 * PAGE_SIZE)  # nothing changed
        memory.discard(PAGE_SIZE, 2 * PAGE_SIZE)
        assert memory.resident_bytes() == 2 * PAGE_SIZE  # punched out of the memfd
        assert memory.read(0, PAGE_SIZE) == b"\x5a" * PAGE_SIZE
        assert memory.read(3 * PAGE_SIZE, PAGE_SIZE) == b"\x5a" * PAGE_SIZE
        assert memory.read(PAGE_SIZE, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
