"""UFFDIO_REGISTER / UNREGISTER (selftest ``register-ioctls``) on anon, shmem, shmem-private."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator

import pytest
from uffd_helpers import Area, make_area, require

from vmmswap.kernel import uffd as abi
from vmmswap.kernel.uffd import Feature, Ioctls, RegisterMode
from vmmswap.uffd import userfaultfd as module
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd

KINDS = ["anon", "shmem", "shmem-private"]
ALL = (Feature.MISSING_SHMEM | Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM
       | Feature.MINOR_SHMEM)


@pytest.fixture(params=KINDS)
def area(request: pytest.FixtureRequest) -> Iterator[Area]:
    a = make_area(request.param, 4)
    yield a
    a.close()


@pytest.fixture
def uffd() -> Iterator[Userfaultfd]:
    require(ALL)
    with Userfaultfd.new(ALL) as u:
        yield u


@pytest.mark.parametrize(("miss", "wp", "minor"), list(itertools.product([0, 1], repeat=3)))
def test_register_ioctls(uffd: Userfaultfd, area: Area, miss: int, wp: int, minor: int) -> None:
    mode = RegisterMode(0)
    if miss:
        mode |= RegisterMode.MISSING
    if wp:
        mode |= RegisterMode.WP
    if minor:
        mode |= RegisterMode.MINOR
    if (minor and area.kind == "anon") or not mode:
        with pytest.raises(OSError) as info:
            uffd.register(area.address, PAGE_SIZE, mode)
        assert info.value.errno == errno.EINVAL
        return
    ioctls = uffd.register(area.address, PAGE_SIZE, mode)
    assert isinstance(ioctls, Ioctls)
    expected = Ioctls.WAKE
    if miss:
        expected |= Ioctls.COPY
    if wp:
        expected |= Ioctls.WRITEPROTECT
    if minor:
        expected |= Ioctls.CONTINUE
    assert ioctls & expected == expected
    if not wp:
        assert Ioctls.WRITEPROTECT not in ioctls  # cleared without MODE_WP
    if not minor:
        assert Ioctls.CONTINUE not in ioctls  # cleared without MODE_MINOR
    uffd.unregister(area.address, PAGE_SIZE)


def test_minor_on_anon_names_the_cause(uffd: Userfaultfd) -> None:
    a = make_area("anon", 1)
    try:
        with pytest.raises(OSError, match="MINOR needs shmem"):
            uffd.register(a.address, PAGE_SIZE, RegisterMode.MINOR)
    finally:
        a.close()


def test_register_twice_with_two_uffds_is_ebusy(uffd: Userfaultfd, area: Area) -> None:
    uffd.register(area.address, area.length)
    with Userfaultfd.new(ALL) as other:
        with pytest.raises(OSError, match="another userfaultfd") as info:
            other.register(area.address, area.length)
        assert info.value.errno == errno.EBUSY
    # Registering again on the same uffd is allowed (it updates the mode).
    uffd.register(area.address, area.length, RegisterMode.MISSING | RegisterMode.WP)
    uffd.unregister(area.address, area.length)


@pytest.mark.parametrize(("offset", "length", "message"), [
    (1, PAGE_SIZE, "not aligned"), (0, 100, "not aligned"), (0, 0, "length is 0"),
])
def test_bad_ranges_are_einval_with_a_reason(uffd: Userfaultfd, area: Area, offset: int,
                                             length: int, message: str) -> None:
    with pytest.raises(OSError, match=message) as info:
        uffd.register(area.address + offset, length)
    assert info.value.errno == errno.EINVAL


def test_unknown_mode_bit_is_rejected(uffd: Userfaultfd, area: Area) -> None:
    with pytest.raises(OSError, match="bits") as info:
        uffd.register(area.address, PAGE_SIZE, RegisterMode(1 << 6) | RegisterMode.MISSING)
    assert info.value.errno == errno.EINVAL


def test_negative_address_is_a_value_error(uffd: Userfaultfd) -> None:
    with pytest.raises(ValueError, match="integers"):
        uffd.register(-PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(ValueError, match="integers"):
        uffd.unregister(-PAGE_SIZE, PAGE_SIZE)


def test_unregister_of_an_unregistered_range_is_fine(uffd: Userfaultfd, area: Area) -> None:
    uffd.unregister(area.address, area.length)


def test_closed_descriptor_is_a_value_error(area: Area) -> None:
    uffd = Userfaultfd.new()
    uffd.close()
    with pytest.raises(ValueError, match="closed"):
        uffd.register(area.address, area.length)
    with pytest.raises(ValueError, match="closed"):
        uffd.unregister(area.address, area.length)



def test_unregister_wakes_the_range_after_clearing_it(
        uffd: Userfaultfd, area: Area, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel wakes a range's waiters before it clears the registration; a waiter that
    faults again in between queues itself anew and nobody wakes it (the torture harness found
    VMM threads blocked for good after disable). So the wrapper wakes the range afterwards."""
    calls: list[tuple[int, int, int]] = []
    real = module._ioctl

    def spy(fd: int, request: int, buf: bytearray) -> object:
        result = real(fd, request, buf)
        start, length = abi.UFFDIO_RANGE_STRUCT.unpack_from(buf, 0)
        calls.append((request, start, length))
        return result

    uffd.register(area.address, area.length, RegisterMode.MISSING)
    monkeypatch.setattr(module, "_ioctl", spy)
    uffd.unregister(area.address, area.length)
    assert calls == [(abi.UFFDIO_UNREGISTER, area.address, area.length),
                     (abi.UFFDIO_WAKE, area.address, area.length)]
