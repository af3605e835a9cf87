"""Errors of the userfaultfd ioctls, as ``OSError`` subclasses a caller can act on.

The fill ioctls (COPY, ZEROPAGE, MOVE, CONTINUE, POISON) report through two channels: errno and
an s64 result field. EAGAIN means two different things there, which the Rust crate conflates:

* result > 0: a *partial* fill; retry from ``addr + result`` (:class:`PartialFillError`).
* result == -EAGAIN: the address space is *changing* (a REMOVE/REMAP/UNMAP/FORK event is unread);
  read the events first, then retry (:class:`MappingChangingError`).
"""

from __future__ import annotations

import errno
import os


class UffdFillError(OSError):
    """Base of fill-ioctl errors; ``bytes_done`` counts bytes filled before the failure."""

    bytes_done: int = 0


class PageExistsError(UffdFillError, FileExistsError):
    """EEXIST: the page is already populated. Benign for a fault that raced; wake the waiter."""


class PartialFillError(UffdFillError, BlockingIOError):
    """EAGAIN with a positive count: only ``bytes_done`` bytes were filled; retry the rest."""

    @property
    def characters_written(self) -> int:  # type: ignore[override]
        return self.bytes_done


class MappingChangingError(UffdFillError, BlockingIOError):
    """EAGAIN with -EAGAIN in the result: a non-cooperative event is unread; read events, retry."""


class ProcessGoneError(UffdFillError, ProcessLookupError):
    """The process the uffd belongs to has exited or exec'd (ESRCH, or ENOMEM on (un)register)."""


class UffdPermissionError(PermissionError):
    """Neither /dev/userfaultfd nor the userfaultfd(2) syscall is permitted."""


def fill_error(op: str, err: int, result: int, bytes_done: int = 0) -> OSError:
    """The exception for a failed fill ioctl, from errno and its s64 result field.

    ``bytes_done`` is what the caller already filled in earlier calls of the same operation.
    """
    if err == errno.EAGAIN:
        if result > 0:
            exc: OSError = PartialFillError(
                err, f"{op}: partially filled ({result} bytes); retry the rest")
            assert isinstance(exc, UffdFillError)
            exc.bytes_done = bytes_done + result
            return exc
        exc = MappingChangingError(
            err, f"{op}: the address space is changing; read pending events, then retry")
    elif err == errno.EEXIST:
        exc = PageExistsError(err, f"{op}: page already populated")
    elif err == errno.ESRCH:
        exc = ProcessGoneError(err, f"{op}: the process owning this userfaultfd has exited")
    else:
        return OSError(err, f"{op}: {os.strerror(err)}")
    assert isinstance(exc, UffdFillError)
    exc.bytes_done = bytes_done
    return exc


def range_error(op: str, err: int) -> OSError:
    """The exception for a failed REGISTER/UNREGISTER/WAKE/WRITEPROTECT."""
    if err == errno.ENOMEM and op in ("UFFDIO_REGISTER", "UFFDIO_UNREGISTER"):
        # The kernel's mmget_not_zero failed: the mm is gone. (ENOMEM is ambiguous in theory;
        # REGISTER allocates nothing that could fail with ENOMEM on these kernels.)
        return ProcessGoneError(err, f"{op}: the process owning this userfaultfd has exited")
    if err == errno.EBUSY and op == "UFFDIO_REGISTER":
        return OSError(err, f"{op}: the range is already registered with another userfaultfd")
    if err == errno.EINVAL:
        return OSError(err, f"{op}: invalid range or mode (unaligned, not fully inside "
                            "compatible registered mappings, or a mode this memory does not "
                            "support)")
    return OSError(err, f"{op}: {os.strerror(err)}")


#: The name the project's first notes used; a partial COPY is the common case.
PartialCopyError = PartialFillError
