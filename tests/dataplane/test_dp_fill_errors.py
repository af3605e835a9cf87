"""Failure paths of the fill ioctls, with a fake uffd that can fail on demand.

The fake keeps "guest memory" as a dict of pages and answers like the kernel: COPY stops with a
partial count at the first existing page, EEXIST when the first page exists.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.uffd.errors import (
    MappingChangingError,
    PageExistsError,
    PartialFillError,
    ProcessGoneError,
)
from vmmswap.uffd.pagesize import PAGE_SIZE

P = PAGE_SIZE
BASE = 0x7F00_0000_0000


class FakeUffd:
    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        #: Page address -> the error every fill reaching it meets (until removed).
        self.fail: dict[int, OSError] = {}
        self.calls: list[tuple[str, int, int]] = []
        self.woken: list[int] = []

    def _limit(self, addr: int, length: int) -> int:
        """Bytes that can be filled before a failing page (raises if it is the first)."""
        for page in range(addr, addr + length, P):
            if page in self.fail:
                if page == addr:
                    raise self.fail[page]
                return page - addr
        return length

    def copy(self, addr: int, length: int, src: int, wake: bool = True) -> int:
        self.calls.append(("copy", addr, length))
        limit = self._limit(addr, length)
        for off in range(0, limit, P):
            if addr + off in self.pages:
                if off == 0:
                    raise PageExistsError(errno.EEXIST, "exists")
                err = PartialFillError(errno.EAGAIN, "partial")
                err.bytes_done = off
                raise err
            self.pages[addr + off] = ctypes.string_at(src + off, P)
        if limit < length:
            err = PartialFillError(errno.EAGAIN, "partial")
            err.bytes_done = limit
            raise err
        return length

    def zero(self, addr: int, length: int, wake: bool = True) -> int:
        self.calls.append(("zero", addr, length))
        self._limit(addr, P)
        if addr in self.pages:
            raise PageExistsError(errno.EEXIST, "exists")
        self.pages[addr] = bytes(P)
        return length

    def wake(self, addr: int, length: int) -> None:
        self.woken.append(addr)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[PageHandler, FakeUffd, int]]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * P)
    for page in range(16):
        os.pwrite(fd, bytes([page + 1]) * P, page * P)
    handler = PageHandler.create([(RegionSpec(0, BASE, 64 * P), fd)], tmp_path, readahead=True)
    handler.move_to_staging()
    yield handler, FakeUffd(), fd
    handler.close()
    os.close(fd)


@pytest.mark.parametrize("error", [
    MappingChangingError(errno.EAGAIN, "changing"),
    ProcessGoneError(errno.ESRCH, "gone"),
    OSError(errno.ENOMEM, "no memory"),
])
def test_failure_on_the_faulting_page_changes_nothing(setup: tuple[PageHandler, FakeUffd, int],
                                                      error: OSError) -> None:
    handler, uffd, _ = setup
    uffd.fail[BASE] = error
    with pytest.raises(type(error)):
        handler.handle_page_fault(uffd, BASE)  # type: ignore[arg-type]
    assert handler.staging_pages == 16
    m = handler.metrics()
    assert m.copied_from_staging_pages == 0 and m.redundant_pages == 0
    uffd.fail.clear()
    handler.handle_page_fault(uffd, BASE)  # type: ignore[arg-type]
    assert uffd.pages[BASE] == b"\x01" * P
    assert handler.staging_pages == 15


def grow_window(handler: PageHandler, uffd: FakeUffd) -> None:
    """Faults at pages 0 and 1: the next fault (page 3) gets a 4-page window."""
    handler.handle_page_fault(uffd, BASE)  # type: ignore[arg-type]
    handler.handle_page_fault(uffd, BASE + P)  # type: ignore[arg-type]


def test_failure_during_readahead_keeps_the_rest_in_staging(
        setup: tuple[PageHandler, FakeUffd, int]) -> None:
    handler, uffd, _ = setup
    grow_window(handler, uffd)
    uffd.fail[BASE + 5 * P] = MappingChangingError(errno.EAGAIN, "changing")
    handler.handle_page_fault(uffd, BASE + 3 * P)  # type: ignore[arg-type]  # no error: served
    assert BASE + 3 * P in uffd.pages and BASE + 4 * P in uffd.pages
    assert BASE + 5 * P not in uffd.pages
    assert handler.staging.present.get(5) and handler.staging.present.get(6)
    assert not handler.staging.present.get(4)


def test_dead_process_during_readahead_is_reported_after_accounting(
        setup: tuple[PageHandler, FakeUffd, int]) -> None:
    handler, uffd, _ = setup
    grow_window(handler, uffd)
    uffd.fail[BASE + 4 * P] = ProcessGoneError(errno.ESRCH, "gone")
    with pytest.raises(ProcessGoneError):
        handler.handle_page_fault(uffd, BASE + 3 * P)  # type: ignore[arg-type]
    assert not handler.staging.present.get(3)  # served: its staging copy is gone
    assert handler.staging.present.get(4)


def test_read_and_write_faults_on_zero_pages(setup: tuple[PageHandler, FakeUffd, int]) -> None:
    handler, uffd, _ = setup
    handler.handle_page_fault(uffd, BASE + 40 * P)  # type: ignore[arg-type]
    handler.handle_page_fault(uffd, BASE + 41 * P, write=True)  # type: ignore[arg-type]
    assert uffd.calls[-2][0] == "zero" and uffd.calls[-1][0] == "copy"
    assert uffd.pages[BASE + 41 * P] == bytes(P)
    handler.handle_page_fault(uffd, BASE + 41 * P, write=True)  # type: ignore[arg-type]
    assert uffd.woken == [BASE + 41 * P]
    m = handler.metrics()
    assert m.zeroed_pages == 2 and m.redundant_pages == 1


def test_unreadable_swap_file_fails_the_fault_and_keeps_the_page(
        setup: tuple[PageHandler, FakeUffd, int], monkeypatch: pytest.MonkeyPatch) -> None:
    handler, uffd, _ = setup
    while handler.swap_out():
        pass
    real = os.preadv

    def eio(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fd == handler.swap_file.fileno():
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(OSError, match="Input/output"):
        handler.handle_page_fault(uffd, BASE + 2 * P)  # type: ignore[arg-type]
    assert handler.swap_file.is_current(2)
    monkeypatch.undo()
    handler.handle_page_fault(uffd, BASE + 2 * P)  # type: ignore[arg-type]
    assert uffd.pages[BASE + 2 * P] == b"\x03" * P


def test_swap_in_reports_progress_before_an_error(
        setup: tuple[PageHandler, FakeUffd, int]) -> None:
    handler, uffd, _ = setup
    ctx = handler.start_swap_in()
    uffd.fail[BASE + 6 * P] = MappingChangingError(errno.EAGAIN, "changing")
    assert ctx.swap_in(uffd) == 6  # type: ignore[arg-type]
    with pytest.raises(MappingChangingError):
        ctx.swap_in(uffd)  # type: ignore[arg-type]
    uffd.fail.clear()
    assert ctx.swap_in(uffd) == 10  # type: ignore[arg-type]
    assert ctx.swap_in(uffd) == 0  # type: ignore[arg-type]
    assert all(uffd.pages[BASE + p * P] == bytes([p + 1]) * P for p in range(16))


@pytest.fixture
def big(tmp_path: Path) -> Iterator[tuple[PageHandler, FakeUffd]]:
    """1024 staged pages; long runs are split between two threads."""
    pages = 1024
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, pages * P)
    for page in range(pages):
        os.pwrite(fd, page.to_bytes(4, "little") * (P // 4), page * P)
    handler = PageHandler.create([(RegionSpec(0, BASE, pages * P), fd)], tmp_path,
                                 readahead=True)
    handler.move_to_staging()
    yield handler, FakeUffd()
    handler.close()
    os.close(fd)


def content_ok(uffd: FakeUffd, page: int) -> bool:
    return uffd.pages.get(BASE + page * P) == page.to_bytes(4, "little") * (P // 4)


def test_split_fill_with_a_failing_helper_half(big: tuple[PageHandler, FakeUffd]) -> None:
    handler, uffd = big
    page = 0
    while True:  # grow a stream until one fault fills 512 pages
        before = handler.staging_pages
        handler.handle_page_fault(uffd, BASE + page * P)  # type: ignore[arg-type]
        filled = before - handler.staging_pages
        page += filled
        if filled >= 256:
            break
    w = handler.staging_pages
    uffd.fail[BASE + (page + 300) * P] = OSError(errno.ENOMEM, "no memory")
    handler.handle_page_fault(uffd, BASE + page * P)  # type: ignore[arg-type]
    assert content_ok(uffd, page) and content_ok(uffd, page + 299)
    assert not content_ok(uffd, page + 300)
    assert handler.staging.present.get(page + 300)  # kept for a retry
    assert handler.staging_pages < w
    uffd.fail.clear()
    handler.handle_page_fault(uffd, BASE + (page + 300) * P)  # type: ignore[arg-type]
    assert content_ok(uffd, page + 300)


def test_split_swap_in_with_a_failing_first_half(big: tuple[PageHandler, FakeUffd]) -> None:
    handler, uffd = big
    ctx = handler.start_swap_in()
    uffd.fail[BASE + 10 * P] = MappingChangingError(errno.EAGAIN, "changing")
    total = ctx.swap_in(uffd)  # type: ignore[arg-type]
    assert 10 <= total < 512
    assert content_ok(uffd, 9) and not content_ok(uffd, 10)
    with pytest.raises(MappingChangingError):
        while True:  # other runs still progress; the stuck one finally raises
            total += ctx.swap_in(uffd)  # type: ignore[arg-type]
    uffd.fail.clear()
    while (n := ctx.swap_in(uffd)) > 0:  # type: ignore[arg-type]
        total += n
    assert total == 1024
    assert all(content_ok(uffd, p) for p in range(1024))
    assert handler.staging_pages == 0


def test_readahead_fill_refused_falls_back_to_one_page(
        setup: tuple[PageHandler, FakeUffd, int]) -> None:
    """A multi-page COPY the kernel refuses (ENOENT: the run crosses a VMA boundary of the
    faulting process) must still serve the faulting page."""
    handler, uffd, _ = setup
    grow_window(handler, uffd)
    real_copy = uffd.copy

    def one_vma_page(addr: int, length: int, src: int, wake: bool = True) -> int:
        if length > P:
            raise OSError(errno.ENOENT, "No such file or directory")
        return real_copy(addr, length, src, wake)

    uffd.copy = one_vma_page  # type: ignore[method-assign]
    handler.handle_page_fault(uffd, BASE + 3 * P)  # type: ignore[arg-type]
    assert content_ok_small(uffd, 3)
    assert handler.staging.present.get(4)  # no readahead this time
    assert not handler.staging.present.get(3)


def content_ok_small(uffd: FakeUffd, page: int) -> bool:
    return uffd.pages.get(BASE + page * P) == bytes([page + 1]) * P
