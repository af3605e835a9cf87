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

The fill, wake and read paths sit on every page fault, so they avoid work a fault does not need:
argument structs come from a small shared pool of buffers (thread-safe: a buffer is popped for one
call and pushed back), errors are diagnosed only after the kernel refused, and a success returns
the requested length (the kernel reports a short fill as an error, never as a success).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import operator
import os
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Final, SupportsIndex

from vmmswap.kernel import libc
from vmmswap.kernel import uffd as abi
from vmmswap.kernel.uffd import FEATURE_SINCE, Feature, Ioctls, RegisterMode
from vmmswap.uffd.errors import (
    PageExistsError,
    UffdFillError,
    UffdPermissionError,
    fill_error,
    invalid_argument_detail,
    range_error,
)
from vmmswap.uffd.events import (
    _FLAGS,
    _PAGEFAULT,
    Event,
    Fork,
    PageFault,
    _new,
    _set_address,
    _set_flags,
    _set_thread_id,
    _unpack_pagefault,
    parse_event,
    parse_events,
)
from vmmswap.uffd.fdinfo import enabled_features

Buffer = bytes | bytearray | memoryview | ctypes.Array[ctypes.c_char]
_BUFFER_TYPES: Final = (bytes, bytearray, memoryview, ctypes.Array)

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

# --- hot-path constants (module globals are cheaper to reach than attribute chains) -----------
_ioctl: Final = fcntl.ioctl
_read: Final = os.read
_MSG_SIZE: Final = abi.UFFD_MSG_SIZE
_COPY: Final = abi.UFFDIO_COPY
_ZEROPAGE: Final = abi.UFFDIO_ZEROPAGE
_WAKE: Final = abi.UFFDIO_WAKE
_pack_copy: Final = abi.UFFDIO_COPY_STRUCT.pack_into
_pack_zeropage: Final = abi.UFFDIO_ZEROPAGE_STRUCT.pack_into
_pack_range: Final = abi.UFFDIO_RANGE_STRUCT.pack_into
_unpack_result: Final = abi.UFFDIO_RESULT_FIELD.unpack_from
_COPY_DONTWAKE: Final = abi.UFFDIO_COPY_MODE_DONTWAKE
_COPY_WP: Final = abi.UFFDIO_COPY_MODE_WP
_ZEROPAGE_DONTWAKE: Final = abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE
_BUF_SIZE: Final = abi.UFFDIO_MAX_STRUCT_SIZE
#: Argument buffers, shared by every descriptor and thread; list.pop/append are atomic.
_buffers: list[bytearray] = [bytearray(_BUF_SIZE) for _ in range(4)]



@dataclass(frozen=True, slots=True)
class KernelSupport:
    """What the running kernel offers, from a UFFDIO_API handshake on a throwaway descriptor."""

    features: Feature
    ioctls: Ioctls


@dataclass(frozen=True, slots=True)
class ForkedUffd(Fork):
    """A :class:`Fork` event with the child's descriptor already wrapped (and owned by it)."""

    uffd: Userfaultfd


#: :attr:`Userfaultfd.created_by` values: which path made the descriptor.
CREATED_BY_DEVICE: Final = "device"
CREATED_BY_SYSCALL: Final = "syscall"


def _create_fd(flags: int, use_device: bool) -> tuple[int, str]:
    """A fresh, not yet initialised uffd and the path that made it (a ``CREATED_BY_*``).

    /dev/userfaultfd first, then the syscall: a device that is missing (kernels before 6.1, a
    container without it) or denied is not an error while the syscall is allowed.
    """
    device_error: OSError | None = None
    if use_device:
        try:
            dev = os.open(abi.USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError) as err:
            device_error = err
        else:
            try:
                return fcntl.ioctl(dev, abi.USERFAULTFD_IOC_NEW, flags), CREATED_BY_DEVICE
            except OSError as err:
                device_error = err
            finally:
                os.close(dev)
    try:
        return libc.syscall(libc.syscall_number("userfaultfd"), flags), CREATED_BY_SYSCALL
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
    """UFFDIO_API: enable ``features``; returns every supported feature and the API ioctls."""
    buf = bytearray(abi.UFFDIO_API_STRUCT.pack(abi.UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, abi.UFFDIO_API_IOCTL, buf, True)
    except OSError as err:
        raise _handshake_error(err.errno or errno.EIO, Feature(features)) from None
    _, got, ioctls = abi.UFFDIO_API_STRUCT.unpack(buf)
    return Feature(got), Ioctls(ioctls)


def _handshake_error(err: int, features: Feature) -> OSError:
    what = f"UFFDIO_API(features={features!r})"
    if err == errno.EPERM:
        return UffdPermissionError(err, f"{what}: {os.strerror(err)} (EVENT_FORK needs "
                                   "CAP_SYS_PTRACE in the creating process)")
    if err == errno.EINVAL and features:
        try:
            supported = int(Userfaultfd.probe().features)
        except OSError:
            supported = None
        # int arithmetic: ~ on an IntFlag complements only the bits the enum knows.
        missing = int(features) & ~supported if supported is not None else 0
        if missing:
            names = ", ".join(_feature_name(bit) for bit in _bits(missing))
            return OSError(err, f"{what}: this kernel ({os.uname().release}) does not support "
                                f"{names}")
    return OSError(err, f"{what}: {os.strerror(err)} (the kernel lacks a requested feature, or "
                        "the descriptor was already initialised: a second UFFDIO_API fails)")


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


def _feature_name(bit: int) -> str:
    """``EVENT_FORK (Linux 4.11)``; unknown bits by value."""
    try:
        feature = Feature(bit)
    except ValueError:
        return hex(bit)
    since = FEATURE_SINCE.get(feature)
    return f"{feature.name} (Linux {since})" if feature.name and since else hex(bit)


def _source_address(src: Buffer, length: int) -> tuple[int, object]:
    """The address of a COPY source buffer, checked to hold ``length`` bytes, and a keep-alive."""
    keep: object
    if isinstance(src, ctypes.Array):
        size, addr, keep = ctypes.sizeof(src), ctypes.addressof(src), src
    else:
        size = memoryview(src).nbytes
        addr, keep = libc.readonly_buffer_address(src)
    if size < length:
        raise ValueError(f"the source buffer holds {size} bytes, fewer than the {length} to copy")
    return addr, keep


class Userfaultfd:
    """A userfaultfd descriptor that is a file: ``fileno``, ``close``, context manager.

    Methods may be called from several threads at once. Closing while another thread still
    uses the descriptor is the caller's race to avoid, as for any file descriptor.
    """

    def __init__(self, fd: int, features: Feature = NO_FEATURES,
                 api_ioctls: Ioctls = NO_IOCTLS, supported: Feature = NO_FEATURES,
                 created_by: str | None = None) -> None:
        self._fd = fd
        #: How :meth:`new` made the descriptor: ``"device"`` (/dev/userfaultfd) or ``"syscall"``
        #: (userfaultfd(2)); ``None`` for a descriptor received from elsewhere. Diagnostics and
        #: tests read it (the two paths differ in who is permitted, not in behaviour).
        self.created_by = created_by
        #: The features enabled on this descriptor (what the handshake asked for; for a
        #: descriptor received from elsewhere, what the caller said it has).
        self.features = features
        #: What UFFDIO_API reported: every feature the kernel supports, and the fd-level ioctls.
        self.supported_features = supported
        self.api_ioctls = api_ioctls
        #: Whoever registers this descriptor's ranges MISSING | WP sets it: fills through it
        #: are then write-protected (COPY_MODE_WP), which a MISSING-only range refuses.
        self.write_protect_fills = False

    # --- creation -------------------------------------------------------------------------------
    @classmethod
    def new(cls, features: Feature | int = NO_FEATURES, *, user_mode_only: bool = False,
            nonblocking: bool = True, cloexec: bool = True, use_device: bool = True,
            ) -> Userfaultfd:
        """Create a uffd and run the UFFDIO_API handshake enabling ``features``.

        /dev/userfaultfd (Linux 6.1+, ordinary file permissions) is tried first, then the
        userfaultfd(2) syscall, which needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1
        unless ``user_mode_only``. A missing *or* denied device falls back to the syscall. When
        neither is permitted, :class:`UffdPermissionError` says how to fix it. A feature the
        kernel lacks is named in the error, with the Linux release that added it.

        ``user_mode_only`` fds catch faults of user-space accesses only: the kernel's own
        accesses to a missing page (``read(2)`` into it, KVM) fail with EFAULT instead.
        """
        flags = (os.O_CLOEXEC if cloexec else 0) | (os.O_NONBLOCK if nonblocking else 0)
        if user_mode_only:
            flags |= abi.UFFD_USER_MODE_ONLY
        fd, created_by = _create_fd(flags, use_device)
        try:
            supported, ioctls = _handshake(fd, int(features))
        except BaseException:
            os.close(fd)
            raise
        enabled = Feature(int(features))
        if enabled & Feature.WP_ASYNC:
            enabled |= Feature.WP_UNPOPULATED  # the kernel turns it on with WP_ASYNC
        return cls(fd, enabled, ioctls, supported, created_by)

    @staticmethod
    def probe(*, user_mode_only: bool = False) -> KernelSupport:
        """The kernel's features and API ioctls, without spending a real descriptor's handshake.

        A second UFFDIO_API on one descriptor always fails, so the probe opens, asks and closes
        its own. Where full mode is not permitted it asks a user-mode-only descriptor, which
        reports the same features.
        """
        flags = os.O_CLOEXEC | (abi.UFFD_USER_MODE_ONLY if user_mode_only else 0)
        try:
            fd, _ = _create_fd(flags, use_device=True)
        except UffdPermissionError:
            if user_mode_only:
                raise
            fd, _ = _create_fd(flags | abi.UFFD_USER_MODE_ONLY, use_device=True)
        try:
            features, ioctls = _handshake(fd, 0)
        finally:
            os.close(fd)
        return KernelSupport(features, ioctls)

    @classmethod
    def from_raw_descriptor(cls, fd: int, features: Feature | None = NO_FEATURES
                            ) -> Userfaultfd:
        """Wrap an initialised uffd received from elsewhere (SCM_RIGHTS, a FORK event); owns it.

        ``features`` records what the creator enabled; None asks the kernel (the fdinfo, see
        :mod:`.fdinfo`), which the caller needs when its choices depend on them.
        """
        if features is None:
            features = enabled_features(fd)
        return cls(fd, Feature(int(features)))

    def try_clone(self) -> Userfaultfd:
        """A second descriptor for the same uffd (dup, close-on-exec)."""
        return Userfaultfd(fcntl.fcntl(self.fileno(), fcntl.F_DUPFD_CLOEXEC, 0),
                           self.features, self.api_ioctls, self.supported_features,
                           self.created_by)

    # --- descriptor -----------------------------------------------------------------------------
    def fileno(self) -> int:
        """The descriptor, for poll/select/epoll and for SCM_RIGHTS."""
        if self._fd < 0:
            raise ValueError("I/O operation on closed userfaultfd")
        return self._fd

    def as_raw_descriptor(self) -> int:
        """The seed's name for :meth:`fileno`."""
        return self.fileno()

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
        if self._fd < 0:
            return "<Userfaultfd closed>"
        try:
            blocking = "non-blocking" if fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_NONBLOCK \
                else "blocking"
        except OSError as err:
            blocking = f"unusable: {err.strerror}"
        features = "|".join(f.name or hex(f.value) for f in self.features) or "none"
        return f"<Userfaultfd fd={self._fd} {blocking} features={features}>"

    def _failed(self, err: Exception) -> None:
        """Raise ValueError for a call that failed because the descriptor was closed."""
        if self._fd < 0:
            raise ValueError("I/O operation on closed userfaultfd") from None

    # --- ranges ---------------------------------------------------------------------------------
    def register(self, addr: int, length: int,
                 mode: RegisterMode | int = RegisterMode.MISSING) -> Ioctls:
        """Register ``[addr, addr + length)``; returns the ioctls the range supports.

        After this, faults of the given kinds in the range are reported on this descriptor and
        the faulting thread sleeps until someone fills or wakes the page. Modes combine
        (``MISSING | WP``); MINOR needs shmem or hugetlbfs memory.

        **Safety** (the seed's argument): COPY and ZEROPAGE only ever fill pages that are
        "uninitialised" -- never touched, or never touched since MADV_REMOVE -- and fail with
        EEXIST on any page that holds data, so the fills cannot overwrite memory. Registering is
        the operation that hands the range's future contents to whoever serves this descriptor,
        so it carries the preconditions: ``[addr, addr + length)`` must lie within a mapping
        that lives as long as the uffd kernel object (which other processes may hold); every
        thread that touches the range must be served (a fault nobody serves blocks forever, and
        a thread that faults while holding the GIL of the process that serves it deadlocks);
        and a page dropped with MADV_REMOVE becomes fillable again, so whoever drops pages
        decides that their old contents are gone.
        """
        buf = bytearray(abi.UFFDIO_REGISTER_STRUCT.size)
        try:
            abi.UFFDIO_REGISTER_STRUCT.pack_into(buf, 0, addr, length, int(mode), 0)
            _ioctl(self._fd, abi.UFFDIO_REGISTER, buf)
        except (OSError, ValueError, struct.error) as err:
            if isinstance(err, OSError) and err.errno == errno.EINVAL:
                self._failed(err)
                detail = invalid_argument_detail("UFFDIO_REGISTER", addr, length, int(mode),
                                                 abi.KNOWN_REGISTER_MODES)
                raise range_error("UFFDIO_REGISTER", errno.EINVAL, detail) from None
            raise self._range_failure("UFFDIO_REGISTER", err, addr, length) from None
        return Ioctls(abi.UFFDIO_REGISTER_STRUCT.unpack(buf)[3])

    def unregister(self, addr: int, length: int) -> None:
        """Stop reporting faults in the range; waiters there retry under normal kernel rules.

        Why the wake after it: the kernel wakes the range's waiters *before* it clears the
        registration, VMA by VMA. A woken thread that retries its fault in between takes the
        VMA's lock, still sees the range registered and queues itself again; nothing wakes it
        after that (found by the torture harness: a VMM thread blocked for good after disable,
        with no range registered and one fault outstanding on the uffd). UFFDIO_WAKE needs no
        registration, so waking the range once the unregister has returned releases every such
        thread, and it then faults as on memory that was never registered.
        """
        self._range_ioctl("UFFDIO_UNREGISTER", abi.UFFDIO_UNREGISTER, addr, length)
        self.wake(addr, length)

    def wake(self, addr: int, length: int) -> None:
        """Wake threads blocked on the range; they fault again if the page is still missing."""
        buf = _buffers.pop() if _buffers else bytearray(_BUF_SIZE)
        try:
            _pack_range(buf, 0, addr, length)
            _ioctl(self._fd, _WAKE, buf)
        except (OSError, ValueError, struct.error) as err:
            raise self._range_failure("UFFDIO_WAKE", err, addr, length) from None
        finally:
            _buffers.append(buf)

    def _range_ioctl(self, name: str, request: int, addr: int, length: int) -> None:
        buf = bytearray(abi.UFFDIO_RANGE_STRUCT.size)
        try:
            _pack_range(buf, 0, addr, length)
            _ioctl(self._fd, request, buf)
        except (OSError, ValueError, struct.error) as err:
            raise self._range_failure(name, err, addr, length) from None

    def _range_failure(self, name: str, err: Exception, addr: int, length: int) -> Exception:
        self._failed(err)
        if not isinstance(err, OSError):
            return _bad_argument(name, err)
        code = err.errno or errno.EIO
        detail = invalid_argument_detail(name, addr, length) if code == errno.EINVAL else ""
        return range_error(name, code, detail)

    # --- fills ----------------------------------------------------------------------------------
    def _fill_failure(self, name: str, err: Exception, buf: bytearray,
                      result_offset: int, addr: int, length: int) -> Exception:
        self._failed(err)
        if not isinstance(err, OSError):
            return _bad_argument(name, err)
        code = err.errno or errno.EIO
        (result,) = _unpack_result(buf, result_offset)
        detail = invalid_argument_detail(name, addr, length) if code == errno.EINVAL else ""
        return fill_error(name, code, result, 0, detail)

    def zero(self, addr: int, length: int, wake: bool = True) -> int:
        """Fill missing pages with zeros; returns bytes filled (``length``).

        Serve read faults this way; a write fault on a zero page faults again at once (copy on
        write), so answer those with :meth:`copy` from a zero buffer. On EEXIST the kernel does
        not wake the waiter: call :meth:`wake`.
        """
        buf = _buffers.pop() if _buffers else bytearray(_BUF_SIZE)
        try:
            # The result field is pre-set to 0: early validation errors do not write it.
            _pack_zeropage(buf, 0, addr, length, 0 if wake else _ZEROPAGE_DONTWAKE, 0)
            _ioctl(self._fd, _ZEROPAGE, buf)
        except (OSError, ValueError, struct.error) as err:
            raise self._fill_failure("UFFDIO_ZEROPAGE", err, buf,
                                     abi.UFFDIO_ZEROPAGE_RESULT_OFFSET, addr, length) from None
        finally:
            _buffers.append(buf)
        return length

    def copy(self, addr: int, length: int, src: int | Buffer, wake: bool = True,
             write_protect: bool = False) -> int:
        """Fill missing pages at ``addr`` from ``src``; returns bytes filled (``length``).

        ``src`` is an address, or a buffer (``bytes``, ``bytearray``, ``memoryview``, a ctypes
        array) of at least ``length`` bytes. ``write_protect`` maps the pages write-protected
        (COPY_MODE_WP, for MISSING|WP ranges). A short fill raises :class:`PartialFillError`;
        :meth:`copy_all` continues through those.

        **Safety**: an integer ``src`` must point at ``length`` readable bytes of this process;
        the kernel copies whatever is there into the target process.
        """
        if type(src) is not int:
            return self._copy_from_buffer(addr, length, src, wake, write_protect)
        buf = _buffers.pop() if _buffers else bytearray(_BUF_SIZE)
        try:
            _pack_copy(buf, 0, addr, src, length, 0 if wake and not write_protect else
                       (0 if wake else _COPY_DONTWAKE) | (_COPY_WP if write_protect else 0), 0)
            _ioctl(self._fd, _COPY, buf)
        except (OSError, ValueError, struct.error) as err:
            raise self._fill_failure("UFFDIO_COPY", err, buf, abi.UFFDIO_COPY_RESULT_OFFSET,
                                     addr, length) from None
        finally:
            _buffers.append(buf)
        return length

    def _copy_from_buffer(self, addr: int, length: int, src: Buffer | SupportsIndex,
                          wake: bool, write_protect: bool) -> int:
        if not isinstance(src, _BUFFER_TYPES) and hasattr(src, "__index__"):
            # An integer-like address (bool, IntEnum, numpy integers).
            return self.copy(addr, length, operator.index(src), wake, write_protect)
        src_addr, keep = _source_address(src, length)  # type: ignore[arg-type]
        try:
            return self.copy(addr, length, src_addr, wake, write_protect)
        finally:
            del keep

    def copy_all(self, addr: int, length: int, src: int | Buffer, wake: bool = True,
                 write_protect: bool = False) -> int:
        """COPY the whole range, continuing through partial results; returns bytes copied.

        Stops with the error (``bytes_done`` set to the total so far) on anything but a partial
        result: EEXIST (a page in the range was already there: the pages before it are filled),
        a changing address space (the caller must read events first), ESRCH.
        """
        keep: object = None
        if type(src) is int:
            src_addr = src
        else:
            src_addr, keep = _source_address(src, length)  # type: ignore[arg-type]
        done = 0
        try:
            while done < length:
                try:
                    done += self.copy(addr + done, length - done, src_addr + done, wake,
                                      write_protect)
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
        """UFFDIO_MOVE (6.8): move private anonymous pages to ``dst``; returns bytes moved.

        The source pages leave ``src`` (it reads as holes afterwards) without a copy. Only the
        process that owns the registered memory may move (the kernel rejects another process
        with EINVAL), and the source must be exclusive to it (MADV_DONTFORK it before forking).
        """
        mode = (0 if wake else abi.UFFDIO_MOVE_MODE_DONTWAKE) | (
            abi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0)
        return self._fill("UFFDIO_MOVE", abi.UFFDIO_MOVE, abi.UFFDIO_MOVE_STRUCT,
                          (dst, src, length, mode, 0), abi.UFFDIO_MOVE_RESULT_OFFSET, dst, length)

    def continue_(self, addr: int, length: int, wake: bool = True,
                  write_protect: bool = False) -> int:
        """UFFDIO_CONTINUE: resolve MINOR faults by mapping the page-cache page already there.

        (``continue`` is a Python keyword.) ``write_protect`` maps it write-protected
        (CONTINUE_MODE_WP, for MINOR|WP ranges). Returns bytes mapped.
        """
        mode = (0 if wake else abi.UFFDIO_CONTINUE_MODE_DONTWAKE) | (
            abi.UFFDIO_CONTINUE_MODE_WP if write_protect else 0)
        return self._fill("UFFDIO_CONTINUE", abi.UFFDIO_CONTINUE, abi.UFFDIO_CONTINUE_STRUCT,
                          (addr, length, mode, 0), abi.UFFDIO_CONTINUE_RESULT_OFFSET,
                          addr, length)

    def poison(self, addr: int, length: int, wake: bool = True) -> int:
        """UFFDIO_POISON (6.6): later accesses to the range raise SIGBUS; returns bytes marked.

        Only PTE markers are installed; no real memory is poisoned.
        """
        mode = 0 if wake else abi.UFFDIO_POISON_MODE_DONTWAKE
        return self._fill("UFFDIO_POISON", abi.UFFDIO_POISON, abi.UFFDIO_POISON_STRUCT,
                          (addr, length, mode, 0), abi.UFFDIO_POISON_RESULT_OFFSET, addr, length)

    def _fill(self, name: str, request: int, layout: struct.Struct, fields: tuple[int, ...],
              result_offset: int, addr: int, length: int) -> int:
        buf = bytearray(layout.size)
        try:
            layout.pack_into(buf, 0, *fields)
            _ioctl(self._fd, request, buf)
        except (OSError, ValueError, struct.error) as err:
            raise self._fill_failure(name, err, buf, result_offset, addr, length) from None
        return length

    def write_protect(self, addr: int, length: int) -> None:
        """Write-protect a range registered with RegisterMode.WP (writes then fault as WP)."""
        self._writeprotect(addr, length, abi.UFFDIO_WRITEPROTECT_MODE_WP)

    def write_unprotect(self, addr: int, length: int, wake: bool = True) -> None:
        """Remove write protection (and wake writers unless ``wake`` is False)."""
        self._writeprotect(addr, length, 0 if wake else abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)

    def _writeprotect(self, addr: int, length: int, mode: int) -> None:
        buf = bytearray(abi.UFFDIO_WRITEPROTECT_STRUCT.size)
        try:
            abi.UFFDIO_WRITEPROTECT_STRUCT.pack_into(buf, 0, addr, length, mode)
            _ioctl(self._fd, abi.UFFDIO_WRITEPROTECT, buf)
        except (OSError, ValueError, struct.error) as err:
            raise self._range_failure("UFFDIO_WRITEPROTECT", err, addr, length) from None

    # --- events ---------------------------------------------------------------------------------
    def read_events(self, max_events: int = _MAX_EVENTS_PER_READ) -> list[Event]:
        """Read up to ``max_events`` pending events with one read(2); [] when none is pending.

        On a blocking descriptor this waits (GIL released) for at least one event. A FORK event
        comes back as :class:`ForkedUffd`, owning the child's descriptor.
        """
        try:
            data = _read(self._fd, max_events * _MSG_SIZE)
        except OSError as err:
            return self._read_failed(err, max_events)
        if len(data) == _MSG_SIZE and data[0] == _PAGEFAULT:
            # The common case, inlined: one page fault.
            flags, address, thread_id = _unpack_pagefault(data)
            event = _new(PageFault)
            _set_address(event, address)
            _set_flags(event, _FLAGS[flags])
            _set_thread_id(event, thread_id)
            return [event]
        return [self._adopt(e) if type(e) is Fork else e for e in parse_events(data)]

    def _read_failed(self, err: OSError, max_events: int) -> list[Event]:
        if isinstance(err, BlockingIOError):
            return []
        self._failed(err)
        if max_events <= 0:
            raise ValueError(f"max_events must be positive, got {max_events}") from None
        raise err

    def read_event(self) -> Event | None:
        """One pending event, or None immediately when none is (non-blocking descriptors)."""
        try:
            data = _read(self._fd, _MSG_SIZE)
        except OSError as err:
            self._read_failed(err, 1)
            return None
        if not data:
            return None
        event = parse_event(data)
        return self._adopt(event) if type(event) is Fork else event

    def _adopt(self, event: Event) -> Event:
        assert isinstance(event, Fork)
        # The child's context inherits this one's features.
        return ForkedUffd(event.fd, Userfaultfd(event.fd, self.features, self.api_ioctls,
                                                self.supported_features))


def _bad_argument(op: str, err: Exception) -> Exception:
    if isinstance(err, struct.error):
        return ValueError(f"{op}: addresses, lengths and modes must be integers in [0, 2**64): "
                          f"{err}")
    return err


def is_page_exists(err: BaseException) -> bool:
    """Whether ``err`` says the page was already there (benign for racing faults)."""
    return isinstance(err, PageExistsError)
