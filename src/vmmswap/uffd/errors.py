"""Errors of the userfaultfd ioctls, as ``OSError`` subclasses a caller can act on.

The fill ioctls (COPY, ZEROPAGE, MOVE, CONTINUE, POISON) report through two channels: errno and
an s64 result field. EAGAIN means two different things there, which the Rust crate conflates:

* result > 0: a *partial* fill; retry from ``addr + result`` (:class:`PartialFillError`).
* result == -EAGAIN: the address space is *changing* (a REMOVE/REMAP/UNMAP/FORK event is unread);
  read the events first, then retry (:class:`MappingChangingError`). Right after the events are
  read the kernel may still report it for a moment (the thread that raised the event has to run
  again to clear the flag), so a retry can see it once more.

| condition | exception | also an instance of |
|---|---|---|
| EEXIST | :class:`PageExistsError` | ``FileExistsError`` |
| EAGAIN, result > 0 | :class:`PartialFillError` (``bytes_done``) | ``BlockingIOError`` |
| EAGAIN, result <= 0 | :class:`MappingChangingError` | ``BlockingIOError`` |
| ESRCH; ENOMEM from (UN)REGISTER | :class:`ProcessGoneError` | ``ProcessLookupError`` |
| creating the fd not permitted | :class:`UffdPermissionError` | ``PermissionError`` |
| anything else | the PEP 3151 ``OSError`` subclass of errno, with a message naming the cause |
"""

from __future__ import annotations

import errno
import os
from typing import Final

from vmmswap.uffd.pagesize import PAGE_SIZE, is_page_aligned


class UffdFillError(OSError):
    """Base of fill-ioctl errors.

    ``bytes_done`` counts bytes filled before the failure (by this call and, for the whole-range
    helpers, by the earlier calls of the same operation); ``result`` is the raw s64 result field
    the kernel wrote (``-errno``, or the partial count), 0 where it wrote none.
    """

    bytes_done: int = 0
    result: int = 0


class PageExistsError(UffdFillError, FileExistsError):
    """EEXIST: the page is already populated. Benign for a fault that raced; wake the waiter."""


class PartialFillError(UffdFillError, BlockingIOError):
    """EAGAIN with a positive count: only ``bytes_done`` bytes were filled; retry the rest."""

    @property
    def characters_written(self) -> int:
        return self.bytes_done

    @characters_written.setter
    def characters_written(self, value: int) -> None:
        self.bytes_done = value


class MappingChangingError(UffdFillError, BlockingIOError):
    """EAGAIN with -EAGAIN in the result: a non-cooperative event is unread; read events, retry."""


class ProcessGoneError(UffdFillError, ProcessLookupError):
    """The process the uffd belongs to has exited or exec'd (ESRCH, or ENOMEM on (un)register)."""


class UffdPermissionError(PermissionError):
    """Neither /dev/userfaultfd nor the userfaultfd(2) syscall is permitted, or a feature is not."""


#: The name the project's first notes used; a partial COPY is the common case.
PartialCopyError = PartialFillError

_RANGE_OPS: Final = frozenset({"UFFDIO_REGISTER", "UFFDIO_UNREGISTER"})

#: Causes worth naming, per ioctl and errno (the man pages' lists, plus what the kernel does).
_NOT_REGISTERED: Final = ("the range is not registered on this userfaultfd: never registered, "
                          "or unmapped or remapped since (read pending events)")

#: Causes worth naming, per ioctl and errno (the man pages' lists, plus what 6.18 does).
_DETAILS: Final[dict[tuple[str, int], str]] = {
    ("UFFDIO_COPY", errno.ENOENT): _NOT_REGISTERED,
    ("UFFDIO_ZEROPAGE", errno.ENOENT): _NOT_REGISTERED,
    ("UFFDIO_POISON", errno.ENOENT): _NOT_REGISTERED,
    ("UFFDIO_CONTINUE", errno.ENOENT): _NOT_REGISTERED,
    ("UFFDIO_COPY", errno.EFAULT): "the source or the argument is not readable memory",
    ("UFFDIO_MOVE", errno.ENOENT): "the source range has holes (pass allow_src_holes=True to "
                                   "skip them), or the destination is not registered",
    ("UFFDIO_MOVE", errno.EBUSY): "a source page is pinned or shared (KSM, or copy-on-write "
                                  "after fork: MADV_DONTFORK the source)",
    ("UFFDIO_CONTINUE", errno.EFAULT): "there is no page in the page cache at that offset; "
                                       "populate it through another mapping first",
    ("UFFDIO_REGISTER", errno.EBUSY): "the range is already registered with another userfaultfd",
    ("UFFDIO_REGISTER", errno.EPERM): "the mapping cannot be registered by this process",
    ("UFFDIO_WRITEPROTECT", errno.ENOENT): "the range is not registered in write-protect mode",
    ("UFFDIO_WRITEPROTECT", errno.EFAULT): "the range is not mapped",
}


def invalid_argument_detail(op: str, addr: int | None, length: int | None,
                            mode: int = 0, known_modes: int | None = None) -> str:
    """Why the kernel probably said EINVAL, computed only once it has (never on the hot path)."""
    if length is not None and length == 0:
        return "the length is 0"
    for name, value in (("address", addr), ("length", length)):
        if value is not None and not is_page_aligned(value):
            return f"the {name} {value:#x} is not aligned to the {PAGE_SIZE}-byte page"
    if known_modes is not None:
        mode, known_modes = int(mode), int(known_modes)  # ~ on an IntFlag drops unknown bits
        if mode == 0:
            return "the mode is empty"
        if mode & ~known_modes:
            return f"the mode {mode:#x} has bits this kernel or memory type does not support"
    if op == "UFFDIO_REGISTER":
        return ("the range is not entirely mapped, or its memory type does not support the mode "
                "(MINOR needs shmem or hugetlbfs; shmem needs the MISSING_SHMEM or "
                "WP_HUGETLBFS_SHMEM feature), or a huge-page range is not aligned to its page "
                "size")
    return ("the range is not entirely inside ranges registered on this userfaultfd in a mode "
            "that allows this ioctl, or it is a huge-page range not aligned to its page size")


def fill_error(op: str, err: int, result: int, bytes_done: int = 0, detail: str = "") -> OSError:
    """The exception for a failed fill ioctl, from errno and its s64 result field.

    ``bytes_done`` is what the caller already filled in earlier calls of the same operation.
    """
    suffix = f" ({detail})" if detail else ""
    exc: OSError
    if err == errno.EAGAIN:
        if result > 0:
            exc = PartialFillError(
                err, f"{op}: partially filled ({result} bytes); retry the rest{suffix}")
            assert isinstance(exc, UffdFillError)
            exc.bytes_done = bytes_done + result
            exc.result = result
            return exc
        exc = MappingChangingError(
            err, f"{op}: the address space is changing; read pending events, then retry{suffix}")
    elif err == errno.EEXIST:
        exc = PageExistsError(err, f"{op}: page already populated{suffix}")
    elif err == errno.ESRCH or (err == errno.ENOSPC and op == "UFFDIO_COPY"):
        # Linux 4.11-4.13 reported a dead process as ENOSPC from COPY.
        exc = ProcessGoneError(err, f"{op}: the process owning this userfaultfd has exited")
    else:
        text = detail or _DETAILS.get((op, err), "")
        return OSError(err, f"{op}: {os.strerror(err)}" + (f" ({text})" if text else ""))
    assert isinstance(exc, UffdFillError)
    exc.bytes_done = bytes_done
    exc.result = result
    return exc


def range_error(op: str, err: int, detail: str = "") -> OSError:
    """The exception for a failed REGISTER/UNREGISTER/WAKE/WRITEPROTECT."""
    if err == errno.ESRCH or (err == errno.ENOMEM and op in _RANGE_OPS):
        # (UN)REGISTER report a failed mmget_not_zero -- the mm is gone -- as ENOMEM.
        return ProcessGoneError(err, f"{op}: the process owning this userfaultfd has exited")
    if err == errno.EAGAIN and op == "UFFDIO_WRITEPROTECT":
        return MappingChangingError(
            err, f"{op}: the address space is changing; read pending events, then retry")
    text = detail or _DETAILS.get((op, err), "")
    return OSError(err, f"{op}: {os.strerror(err)}" + (f" ({text})" if text else ""))
