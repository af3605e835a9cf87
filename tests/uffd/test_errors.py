"""Error mapping of the fill and range ioctls (pure: built from errno and the result field)."""

from __future__ import annotations

import errno

import pytest

from vmmswap.uffd.errors import (
    MappingChangingError,
    PageExistsError,
    PartialCopyError,
    PartialFillError,
    ProcessGoneError,
    UffdFillError,
    UffdPermissionError,
    fill_error,
    invalid_argument_detail,
    range_error,
)
from vmmswap.uffd.pagesize import PAGE_SIZE


def test_eexist_is_a_file_exists_error() -> None:
    err = fill_error("UFFDIO_COPY", errno.EEXIST, -errno.EEXIST)
    assert isinstance(err, PageExistsError)
    assert isinstance(err, FileExistsError)
    assert err.errno == errno.EEXIST
    assert err.result == -errno.EEXIST
    assert "already populated" in str(err)


def test_partial_fill_carries_the_bytes_done() -> None:
    err = fill_error("UFFDIO_COPY", errno.EAGAIN, 8192)
    assert isinstance(err, PartialFillError)
    assert isinstance(err, BlockingIOError)
    assert err.bytes_done == 8192
    assert err.characters_written == 8192
    assert err.result == 8192


def test_partial_fill_adds_what_earlier_calls_did() -> None:
    err = fill_error("UFFDIO_ZEROPAGE", errno.EAGAIN, PAGE_SIZE, bytes_done=3 * PAGE_SIZE)
    assert isinstance(err, PartialFillError)
    assert err.bytes_done == 4 * PAGE_SIZE


@pytest.mark.parametrize("result", [-errno.EAGAIN, 0])
def test_changing_mapping_is_not_a_partial_fill(result: int) -> None:
    """EAGAIN with -EAGAIN (or an untouched 0) in the field: read events first (not partial)."""
    err = fill_error("UFFDIO_COPY", errno.EAGAIN, result)
    assert isinstance(err, MappingChangingError)
    assert isinstance(err, BlockingIOError)
    assert not isinstance(err, PartialFillError)
    assert err.bytes_done == 0
    assert "read pending events" in str(err)


@pytest.mark.parametrize("op", ["UFFDIO_COPY", "UFFDIO_ZEROPAGE", "UFFDIO_MOVE",
                                "UFFDIO_CONTINUE", "UFFDIO_POISON"])
def test_esrch_means_the_process_is_gone(op: str) -> None:
    err = fill_error(op, errno.ESRCH, -errno.ESRCH)
    assert isinstance(err, ProcessGoneError)
    assert isinstance(err, ProcessLookupError)


def test_old_kernels_enospc_from_copy_means_gone() -> None:
    assert isinstance(fill_error("UFFDIO_COPY", errno.ENOSPC, -errno.ENOSPC), ProcessGoneError)


@pytest.mark.parametrize("op", ["UFFDIO_REGISTER", "UFFDIO_UNREGISTER"])
def test_enomem_from_register_means_the_process_is_gone(op: str) -> None:
    assert isinstance(range_error(op, errno.ENOMEM), ProcessGoneError)


def test_enomem_elsewhere_is_memory() -> None:
    err = range_error("UFFDIO_WAKE", errno.ENOMEM)
    assert not isinstance(err, ProcessGoneError)
    assert not isinstance(fill_error("UFFDIO_MOVE", errno.ENOMEM, -errno.ENOMEM), UffdFillError)


def test_writeprotect_eagain_is_a_changing_mapping() -> None:
    assert isinstance(range_error("UFFDIO_WRITEPROTECT", errno.EAGAIN), MappingChangingError)


def test_other_errnos_get_their_pep3151_class_and_a_cause() -> None:
    err = fill_error("UFFDIO_MOVE", errno.ENOENT, -errno.ENOENT)
    assert isinstance(err, FileNotFoundError)
    assert "holes" in str(err)
    err = fill_error("UFFDIO_CONTINUE", errno.EFAULT, -errno.EFAULT)
    assert "page cache" in str(err)
    err = range_error("UFFDIO_REGISTER", errno.EBUSY)
    assert err.errno == errno.EBUSY
    assert "another userfaultfd" in str(err)
    assert not isinstance(err, UffdFillError)


def test_invalid_argument_details() -> None:
    assert "length is 0" in invalid_argument_detail("UFFDIO_COPY", 0x1000, 0)
    assert "address 0x1001" in invalid_argument_detail("UFFDIO_COPY", 0x1001, PAGE_SIZE)
    assert "length 0x10" in invalid_argument_detail("UFFDIO_COPY", 0x1000, 16)
    assert "mode is empty" in invalid_argument_detail("UFFDIO_REGISTER", 0x1000, PAGE_SIZE, 0, 7)
    assert "bits" in invalid_argument_detail("UFFDIO_REGISTER", 0x1000, PAGE_SIZE, 8, 7)
    assert "MINOR" in invalid_argument_detail("UFFDIO_REGISTER", 0x1000, PAGE_SIZE, 4, 7)
    assert "registered" in invalid_argument_detail("UFFDIO_COPY", 0x1000, PAGE_SIZE)


def test_aliases_and_bases() -> None:
    assert PartialCopyError is PartialFillError
    assert issubclass(UffdPermissionError, PermissionError)
    for cls in (PageExistsError, PartialFillError, MappingChangingError, ProcessGoneError):
        assert issubclass(cls, UffdFillError)
        assert issubclass(cls, OSError)
