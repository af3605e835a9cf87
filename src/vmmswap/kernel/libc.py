"""libc calls through ctypes, and the memory-management constants they take.

Every call goes through :data:`libc`, a ``CDLL``: ctypes releases the GIL around foreign calls,
so a call that faults on userfaultfd-registered memory blocks only its own thread and never the
handler threads of the same process.  Failures raise the ``OSError`` subclass that matches errno
(PEP 3151), with a message naming the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Final


def _load_libc() -> ctypes.CDLL:
    """glibc by its soname; ``find_library`` only as a fallback, since it runs ``ldconfig -p``
    in a child process: a spare monitor doing that at start-up, a child of the VMM, had its
    vfork child frozen by an enable's freeze of the VMM tree, and the freeze timed out."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


libc: Final = _load_libc()

# --- mmap(2) -------------------------------------------------------------------------------------
PROT_NONE: Final = 0x0
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
PROT_EXEC: Final = 0x4

MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000
MAP_POPULATE: Final = 0x8000
MAP_FIXED_NOREPLACE: Final = 0x100000

MAP_FAILED: Final = ctypes.c_void_p(-1).value

MREMAP_MAYMOVE: Final = 1
MREMAP_FIXED: Final = 2
MREMAP_DONTUNMAP: Final = 4

# --- madvise(2) ----------------------------------------------------------------------------------
MADV_NORMAL: Final = 0
MADV_RANDOM: Final = 1
MADV_SEQUENTIAL: Final = 2
MADV_WILLNEED: Final = 3
MADV_DONTNEED: Final = 4
MADV_FREE: Final = 8
MADV_REMOVE: Final = 9
MADV_DONTFORK: Final = 10
MADV_DOFORK: Final = 11
MADV_HUGEPAGE: Final = 14
MADV_NOHUGEPAGE: Final = 15
MADV_COLD: Final = 20
MADV_PAGEOUT: Final = 21
MADV_POPULATE_READ: Final = 22
MADV_POPULATE_WRITE: Final = 23
MADV_COLLAPSE: Final = 25

# --- memfd_create(2): linux/memfd.h, asm-generic/hugetlb_encode.h; linux/magic.h ----------
MFD_CLOEXEC: Final = 0x0001
MFD_HUGETLB: Final = 0x0004
MFD_HUGE_SHIFT: Final = 26
#: log2 of the huge page size, in the bits above MFD_HUGE_SHIFT: 21 = 2 MiB.
MFD_HUGE_2MB: Final = 21 << MFD_HUGE_SHIFT
MFD_HUGE_1GB: Final = 30 << MFD_HUGE_SHIFT
#: ``f_type`` of a hugetlbfs file (linux/magic.h); a hugetlb memfd reports it too.
HUGETLBFS_MAGIC: Final = 0x958458F6

# --- mlock2(2) -----------------------------------------------------------------------------------
MLOCK_ONFAULT: Final = 0x01

# --- prctl(2) ------------------------------------------------------------------------------------
PR_SET_PDEATHSIG: Final = 1
PR_SET_NAME: Final = 15

# --- fallocate(2) --------------------------------------------------------------------------------
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

# --- syscall numbers -----------------------------------------------------------------------------
_SYSCALLS: Final[dict[str, dict[str, int]]] = {
    "x86_64": {"userfaultfd": 323, "mlock2": 325, "process_madvise": 440},
    # asm-generic table: arm64, riscv64, loongarch64.
    "aarch64": {"userfaultfd": 282, "mlock2": 284, "process_madvise": 440},
    "riscv64": {"userfaultfd": 282, "mlock2": 284, "process_madvise": 440},
    "loongarch64": {"userfaultfd": 282, "mlock2": 284, "process_madvise": 440},
}


def syscall_number(name: str) -> int:
    """The number of ``name`` on this architecture; NotImplementedError if it is not known."""
    table = _SYSCALLS.get(platform.machine())
    if table is None or name not in table:
        raise NotImplementedError(f"no syscall number for {name} on {platform.machine()}")
    return table[name]


# --- prototypes ----------------------------------------------------------------------------------
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munlock.restype = ctypes.c_int
libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.memcmp.restype = ctypes.c_int
libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
libc.memset.restype = ctypes.c_void_p
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.syscall.restype = ctypes.c_long
libc.prctl.restype = ctypes.c_int
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
libc.fallocate.restype = ctypes.c_int
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.fstatfs.restype = ctypes.c_int
libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]

#: ``struct statfs`` on x86_64 is 120 bytes; ``f_type`` (a long) comes first.
STATFS_SIZE: Final = 120


def fs_type(fd: int) -> int:
    """The file system magic (``statfs.f_type``) of the file open as ``fd``."""
    buf = ctypes.create_string_buffer(STATFS_SIZE)
    if libc.fstatfs(fd, buf) != 0:
        raise raise_errno("fstatfs")
    return int.from_bytes(buf.raw[:8], "little", signed=True) & 0xFFFFFFFF


def raise_errno(what: str, err: int | None = None, hint: str = "") -> OSError:
    """Build the ``OSError`` subclass for ``err`` (default: ctypes' saved errno).

    The result is returned, not raised, so call sites read ``raise raise_errno(...)`` and type
    checkers see the control flow.
    """
    if err is None:
        err = ctypes.get_errno()
    message = f"{what}: {os.strerror(err)}"
    if hint:
        message = f"{message} ({hint})"
    return OSError(err, message)


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2); returns the address of the new mapping."""
    ret = libc.mmap(addr or None, length, prot, flags, fd, offset)
    if ret is None or ret == MAP_FAILED:
        raise raise_errno(f"mmap(length={length:#x}, prot={prot:#x}, flags={flags:#x}, fd={fd})")
    return int(ret)


def munmap(addr: int, length: int) -> None:
    """munmap(2)."""
    if libc.munmap(addr, length) != 0:
        raise raise_errno(f"munmap({addr:#x}, {length:#x})")


def mremap(old_addr: int, old_length: int, new_length: int, flags: int, new_addr: int = 0) -> int:
    """mremap(2); returns the new address."""
    ret = libc.mremap(old_addr, old_length, new_length, flags, new_addr or None)
    if ret is None or ret == MAP_FAILED:
        raise raise_errno(f"mremap({old_addr:#x}, {old_length:#x} -> {new_length:#x})")
    return int(ret)


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2).

    **Safety**: MADV_REMOVE and MADV_DONTNEED discard memory contents; the range must hold
    nothing anyone still needs.
    """
    if libc.madvise(addr, length, advice) != 0:
        raise raise_errno(f"madvise({addr:#x}, {length:#x}, {advice})")


def mlock2(addr: int, length: int, flags: int = 0) -> None:
    """mlock2(2) through syscall(2): glibc's wrapper is newer than some targets."""
    ret = libc.syscall(
        ctypes.c_long(syscall_number("mlock2")), ctypes.c_void_p(addr), ctypes.c_size_t(length),
        ctypes.c_uint(flags),
    )
    if ret != 0:
        raise raise_errno(f"mlock2({addr:#x}, {length:#x}, {flags})",
                          hint="RLIMIT_MEMLOCK may be too small")


def munlock(addr: int, length: int) -> None:
    """munlock(2)."""
    if libc.munlock(addr, length) != 0:
        raise raise_errno(f"munlock({addr:#x}, {length:#x})")


def memcmp(a: int, b: int, length: int) -> int:
    """memcmp(3) between two addresses, GIL released."""
    return int(libc.memcmp(a, b, length))


def memmove(dst: int, src: int, length: int) -> None:
    """memmove(3) between two addresses, GIL released (safe on registered memory)."""
    ctypes.memmove(dst, src, length)


def memset(dst: int, value: int, length: int) -> None:
    """memset(3), GIL released."""
    libc.memset(dst, value, length)


def syscall(number: int, *args: int) -> int:
    """syscall(2) with integer arguments; raises on -1."""
    ret = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if ret == -1:
        raise raise_errno(f"syscall({number})")
    return int(ret)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2)."""
    ret = libc.prctl(option, arg2, arg3, arg4, arg5)
    if ret == -1:
        raise raise_errno(f"prctl({option})")
    return int(ret)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), for punching holes in files."""
    if libc.fallocate(fd, mode, offset, length) != 0:
        raise raise_errno(f"fallocate(fd={fd}, mode={mode:#x}, {offset:#x}, {length:#x})")


def buffer_address(buffer: bytearray | memoryview | ctypes.Array[ctypes.c_char]) -> int:
    """The address of a writable buffer's first byte (the buffer must outlive its use)."""
    if isinstance(buffer, ctypes.Array):
        return ctypes.addressof(buffer)
    view = memoryview(buffer)
    if view.readonly:
        raise ValueError("buffer must be writable to take its address")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def readonly_buffer_address(buffer: bytes | bytearray | memoryview) -> tuple[int, object]:
    """The address of any contiguous buffer, plus an object that keeps it alive.

    Read-only buffers (``bytes``) have no writable export; their address is taken through a
    ``c_char_p`` whose lifetime the returned keep-alive object pins.
    """
    if isinstance(buffer, bytes):
        keep = ctypes.c_char_p(buffer)
        return ctypes.cast(keep, ctypes.c_void_p).value or 0, keep
    view = memoryview(buffer)
    if not view.contiguous:
        raise ValueError("buffer must be contiguous")
    if view.readonly:
        data = view.tobytes()
        keep = ctypes.c_char_p(data)
        return ctypes.cast(keep, ctypes.c_void_p).value or 0, (keep, data)
    return buffer_address(view), view



class Iovec(ctypes.Structure):
    """``struct iovec`` (sys/uio.h)."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def process_madvise(pidfd: int, addr: int, length: int, advice: int) -> int:
    """process_madvise(2) of one range of the process behind ``pidfd``; returns the bytes the
    kernel advised (it may stop short: call again for the rest)."""
    iov = Iovec(addr, length)
    return syscall(syscall_number("process_madvise"), pidfd, ctypes.addressof(iov), 1, advice, 0)
