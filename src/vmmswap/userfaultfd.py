"""The ``Userfaultfd`` wrapper: the seed's API over the whole Linux 6.18 interface.

**Safety** (the seed's argument, carried over): UFFDIO_COPY and UFFDIO_ZEROPAGE look dangerous,
since they fill memory directly, but they never overwrite anything. They only populate pages that
are *missing* -- never touched, or dropped by MADV_REMOVE -- and fail with EEXIST on a page that
is already there. Filling a never-touched page cannot break anyone's data. Filling a page dropped
by MADV_REMOVE can, but that decision was made at MADV_REMOVE and UFFDIO_REGISTER time. So the
operations that need care are :meth:`Userfaultfd.register` and MADV_REMOVE, not the fills.

Every descriptor is close-on-exec and non-blocking by default. All ioctl argument structs are
under 1 KiB, so ``fcntl.ioctl`` copies them to the stack and releases the GIL around the call,
and it copies the struct back even when the call fails: the result field is readable after an
error, which is how partial fills are told from a changing address space.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from vmmswap.kernel import libc
from vmmswap.kernel import uffd as abi
from vmmswap.kernel.uffd import Feature, Ioctls, RegisterMode
from vmmswap.uffd_errors import (
    PageExistsError,
    UffdFillError,
    UffdPermissionError,
    fill_error,
    range_error,
)
from vmmswap.uffd_events import Event, Fork, parse_events

Buffer = bytes | bytearray | memoryview | ctypes.Array[ctypes.c_char]

#: Features vmm-swap needs: MISSING faults on shmem (memfd guest memory) and REMOVE events for
#: the balloon.
VMM_SWAP_FEATURES: Final = Feature.MISSING_SHMEM | Feature.EVENT_REMOVE

_MAX_EVENTS_PER_READ: Final = 64
NO_FEATURES: Final = Feature(0)
NO_IOCTLS: Final = Ioctls(0)

_PERMISSION_HINT: Final = (
    "userfaultfd is not permitted: make /dev/userfaultfd readable and writable by this user "
    "(e.g. a 'userfaultfd' group and a udev rule), or give the process CAP_SYS_PTRACE, or set "
    "the sysctl vm.unprivileged_userfaultfd=1, or pass user_mode_only=True if only user-space "
    "faults need to be caught (kernel accesses such as KVM's then fail with EFAULT)"
)


@dataclass(frozen=True, slots=True)
class KernelSupport:
    """What the running kernel offers, from a UFFDIO_API handshake on a throwaway descriptor."""

    features: Feature
    ioctls: Ioctls


@dataclass(frozen=True, slots=True)
class ForkedUffd(Fork):
    """A :class:`Fork` event with the child's descriptor already wrapped."""

    uffd: Userfaultfd


def _create_fd(flags: int, use_device: bool) -> int:
    """A fresh, not yet initialised uffd: /dev/userfaultfd first, then the syscall."""
    device_error: OSError | None = None
    if use_device:
        try:
            dev = os.open(abi.USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError) as err:
            device_error = err
        else:
            try:
                return fcntl.ioctl(dev, abi.USERFAULTFD_IOC_NEW, flags)
            except OSError as err:
                device_error = err
            finally:
                os.close(dev)
    try:
        return libc.syscall(libc.syscall_number("userfaultfd"), flags)
    except PermissionError as err:
        detail = f"; {abi.USERFAULTFD_DEVICE}: {device_error.strerror}" if device_error else ""
        raise UffdPermissionError(err.errno, f"userfaultfd(2): {err.strerror}{detail}. "
                                  f"{_PERMISSION_HINT}") from err
    except OSError as err:
        if err.errno == errno.EINVAL and flags & abi.UFFD_USER_MODE_ONLY:
            # Kernels before 5.11 do not know UFFD_USER_MODE_ONLY.
            return _create_fd(flags & ~abi.UFFD_USER_MODE_ONLY, use_device=False)
        if err.errno == errno.ENOSYS:
            raise OSError(err.errno, "userfaultfd(2) is not available: the kernel was built "
                          "without CONFIG_USERFAULTFD") from err
        raise


def _handshake(fd: int, features: int) -> tuple[Feature, Ioctls]:
    buf = bytearray(abi.UFFDIO_API_STRUCT.pack(abi.UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, abi.UFFDIO_API_IOCTL, buf, True)
    except OSError as err:
        raise OSError(err.errno, f"UFFDIO_API(features={Feature(features)!r}): {err.strerror}"
                      " (the kernel lacks a requested feature, EVENT_FORK needs "
                      "CAP_SYS_PTRACE, or the descriptor was already initialised)") from err
    _, got, ioctls = abi.UFFDIO_API_STRUCT.unpack(buf)
    return Feature(got), Ioctls(ioctls)


def _address_of(src: int | Buffer) -> tuple[int, object]:
    if isinstance(src, int):
        return src, None
    if isinstance(src, ctypes.Array):
        return ctypes.addressof(src), src
    return libc.readonly_buffer_address(src)


class Userfaultfd:
    """A userfaultfd descriptor that is a file: ``fileno``, ``close``, context manager."""

    def __init__(self, fd: int, features: Feature = NO_FEATURES,
                 api_ioctls: Ioctls = NO_IOCTLS, supported: Feature = NO_FEATURES) -> None:
        self._fd = fd
        #: The features enabled on this descriptor (what the handshake asked for).
        self.features = features
        #: What UFFDIO_API reported: every feature the kernel supports, and the fd-level ioctls.
        self.supported_features = supported
        self.api_ioctls = api_ioctls

    # --- creation -------------------------------------------------------------------------------
    @classmethod
    def new(cls, features: Feature | int = NO_FEATURES, *, user_mode_only: bool = False,
            nonblocking: bool = True, cloexec: bool = True, use_device: bool = True,
            ) -> Userfaultfd:
        """Create a uffd and run the UFFDIO_API handshake enabling ``features``.

        /dev/userfaultfd (Linux 6.1+, ordinary file permissions) is tried first, then the
        userfaultfd(2) syscall, which needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1
        unless ``user_mode_only``. A missing *or* denied device falls back to the syscall.
        """
        flags = (os.O_CLOEXEC if cloexec else 0) | (os.O_NONBLOCK if nonblocking else 0)
        if user_mode_only:
            flags |= abi.UFFD_USER_MODE_ONLY
        fd = _create_fd(flags, use_device)
        try:
            supported, ioctls = _handshake(fd, int(features))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, Feature(int(features)), ioctls, supported)

    @staticmethod
    def probe(*, user_mode_only: bool = False) -> KernelSupport:
        """The kernel's features and API ioctls, without spending a real descriptor's handshake.

        A second UFFDIO_API on one descriptor always fails, so the probe uses its own.
        """
        flags = os.O_CLOEXEC | (abi.UFFD_USER_MODE_ONLY if user_mode_only else 0)
        fd = _create_fd(flags, use_device=True)
        try:
            features, ioctls = _handshake(fd, 0)
        finally:
            os.close(fd)
        return KernelSupport(features, ioctls)

    @classmethod
    def from_raw_descriptor(cls, fd: int, features: Feature = NO_FEATURES) -> Userfaultfd:
        """Wrap an initialised uffd received from elsewhere (SCM_RIGHTS, a FORK event); owns it."""
        return cls(fd, features)

    def try_clone(self) -> Userfaultfd:
        """A second descriptor for the same uffd (dup, close-on-exec)."""
        return Userfaultfd(fcntl.fcntl(self.fileno(), fcntl.F_DUPFD_CLOEXEC, 0),
                           self.features, self.api_ioctls, self.supported_features)

    # --- descriptor -----------------------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed userfaultfd")
        return self._fd

    as_raw_descriptor = fileno

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """Give up ownership of the descriptor and return it."""
        fd, self._fd = self.fileno(), -1
        return fd

    def close(self) -> None:
        """Close the descriptor; the kernel unregisters every range once the last copy closes."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<Userfaultfd closed>"
        return f"<Userfaultfd fd={self._fd} features={self.features!r}>"

    # --- ranges ---------------------------------------------------------------------------------
    def register(self, addr: int, length: int,
                 mode: RegisterMode | int = RegisterMode.MISSING) -> Ioctls:
        """Register ``[addr, addr + length)``; returns the ioctls the range supports.

        After this, faults of the given kinds in the range are reported on this descriptor and
        the faulting thread sleeps until someone fills or wakes the page.

        **Safety**: the range must lie within a mapping that outlives the uffd kernel object (which
        may be held by other processes), and every process and thread that touches the memory
        must be served: a fault nobody serves blocks forever, and a range left unregistered in
        one process while its pages were MADV_REMOVE'd is silently zero-filled by the kernel.
        """
        buf = bytearray(abi.UFFDIO_REGISTER_STRUCT.pack(addr, length, int(mode), 0))
        try:
            fcntl.ioctl(self.fileno(), abi.UFFDIO_REGISTER, buf, True)
        except OSError as err:
            raise range_error("UFFDIO_REGISTER", err.errno or errno.EIO) from None
        return Ioctls(abi.UFFDIO_REGISTER_STRUCT.unpack(buf)[3])

    def unregister(self, addr: int, length: int) -> None:
        """Stop reporting faults in the range; waiters there retry under normal kernel rules."""
        self._range_ioctl("UFFDIO_UNREGISTER", abi.UFFDIO_UNREGISTER, addr, length)

    def wake(self, addr: int, length: int) -> None:
        """Wake threads blocked on the range; they fault again if the page is still missing."""
        self._range_ioctl("UFFDIO_WAKE", abi.UFFDIO_WAKE, addr, length)

    def _range_ioctl(self, name: str, request: int, addr: int, length: int) -> None:
        buf = bytearray(abi.UFFDIO_RANGE_STRUCT.pack(addr, length))
        try:
            fcntl.ioctl(self.fileno(), request, buf, True)
        except OSError as err:
            raise range_error(name, err.errno or errno.EIO) from None

    # --- fills ----------------------------------------------------------------------------------
    def _fill(self, name: str, request: int, layout_pack: bytes, result_offset: int) -> int:
        buf = bytearray(layout_pack)
        try:
            fcntl.ioctl(self.fileno(), request, buf, True)
        except OSError as err:
            result = int.from_bytes(buf[result_offset:result_offset + 8], "little", signed=True)
            raise fill_error(name, err.errno or errno.EIO, result) from None
        return int.from_bytes(buf[result_offset:result_offset + 8], "little", signed=True)

    def zero(self, addr: int, length: int, wake: bool = True) -> int:
        """Fill missing pages with zeros; returns bytes filled.

        On EEXIST the kernel does not wake the waiter: call :meth:`wake`.
        """
        mode = 0 if wake else abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        # Pre-set the result field: early validation errors do not write it.
        return self._fill("UFFDIO_ZEROPAGE", abi.UFFDIO_ZEROPAGE,
                          abi.UFFDIO_ZEROPAGE_STRUCT.pack(addr, length, mode, 0), 24)

    def copy(self, addr: int, length: int, src: int | Buffer, wake: bool = True,
             write_protect: bool = False) -> int:
        """Fill missing pages at ``addr`` from ``src`` (an address or a buffer); returns bytes.

        ``write_protect`` maps the pages write-protected (COPY_MODE_WP, for MISSING|WP ranges).
        """
        src_addr, keep = _address_of(src)
        mode = (0 if wake else abi.UFFDIO_COPY_MODE_DONTWAKE) | (
            abi.UFFDIO_COPY_MODE_WP if write_protect else 0)
        try:
            return self._fill("UFFDIO_COPY", abi.UFFDIO_COPY,
                              abi.UFFDIO_COPY_STRUCT.pack(addr, src_addr, length, mode, 0), 32)
        finally:
            del keep

    def copy_all(self, addr: int, length: int, src: int | Buffer, wake: bool = True) -> int:
        """COPY the whole range, continuing through partial results; returns bytes copied.

        Stops with the error (``bytes_done`` set to the total so far) on anything but a partial
        result: EEXIST, a changing address space (the caller must read events first), ESRCH.
        """
        src_addr, keep = _address_of(src)
        done = 0
        try:
            while done < length:
                try:
                    done += self.copy(addr + done, length - done, src_addr + done, wake)
                except UffdFillError as err:
                    if err.errno == errno.EAGAIN and err.bytes_done > 0:
                        done += err.bytes_done
                        continue
                    err.bytes_done = done
                    raise
        finally:
            del keep
        return done

    def move(self, dst: int, src: int, length: int, wake: bool = True,
             allow_src_holes: bool = False) -> int:
        """UFFDIO_MOVE (6.8): move private anonymous pages of the *same* process; returns bytes.

        The kernel rejects it when the caller is another process than the uffd's owner.
        """
        mode = (0 if wake else abi.UFFDIO_MOVE_MODE_DONTWAKE) | (
            abi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0)
        return self._fill("UFFDIO_MOVE", abi.UFFDIO_MOVE,
                          abi.UFFDIO_MOVE_STRUCT.pack(dst, src, length, mode, 0), 32)

    def write_protect(self, addr: int, length: int) -> None:
        """Write-protect a range registered with RegisterMode.WP."""
        self._writeprotect(addr, length, abi.UFFDIO_WRITEPROTECT_MODE_WP)

    def write_unprotect(self, addr: int, length: int, wake: bool = True) -> None:
        """Remove write protection (and wake writers unless ``wake`` is False)."""
        self._writeprotect(addr, length, 0 if wake else abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)

    def _writeprotect(self, addr: int, length: int, mode: int) -> None:
        buf = bytearray(abi.UFFDIO_WRITEPROTECT_STRUCT.pack(addr, length, mode))
        try:
            fcntl.ioctl(self.fileno(), abi.UFFDIO_WRITEPROTECT, buf, True)
        except OSError as err:
            raise range_error("UFFDIO_WRITEPROTECT", err.errno or errno.EIO) from None

    def continue_(self, addr: int, length: int, wake: bool = True,
                  write_protect: bool = False) -> int:
        """UFFDIO_CONTINUE: resolve MINOR faults by mapping the page-cache page already there."""
        mode = (0 if wake else abi.UFFDIO_CONTINUE_MODE_DONTWAKE) | (
            abi.UFFDIO_CONTINUE_MODE_WP if write_protect else 0)
        return self._fill("UFFDIO_CONTINUE", abi.UFFDIO_CONTINUE,
                          abi.UFFDIO_CONTINUE_STRUCT.pack(addr, length, mode, 0), 24)

    def poison(self, addr: int, length: int, wake: bool = True) -> int:
        """UFFDIO_POISON: later accesses to the range raise SIGBUS; returns bytes marked."""
        mode = 0 if wake else abi.UFFDIO_POISON_MODE_DONTWAKE
        return self._fill("UFFDIO_POISON", abi.UFFDIO_POISON,
                          abi.UFFDIO_POISON_STRUCT.pack(addr, length, mode, 0), 24)

    # --- events ---------------------------------------------------------------------------------
    def read_events(self, max_events: int = _MAX_EVENTS_PER_READ) -> list[Event]:
        """Read up to ``max_events`` pending events with one read(2); [] when none is pending."""
        try:
            data = os.read(self.fileno(), abi.UFFD_MSG_SIZE * max_events)
        except BlockingIOError:
            return []
        events = parse_events(data)
        return [ForkedUffd(e.fd, Userfaultfd(e.fd, self.features))
                if isinstance(e, Fork) else e for e in events]

    def read_event(self) -> Event | None:
        """One pending event, or None immediately when none is (non-blocking descriptors)."""
        events = self.read_events(1)
        return events[0] if events else None


def is_page_exists(err: BaseException) -> bool:
    """Whether ``err`` says the page was already there (benign for racing faults)."""
    return isinstance(err, PageExistsError)
