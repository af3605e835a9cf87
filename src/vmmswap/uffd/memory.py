"""Memory mappings the project owns.

A :class:`Mapping` is an ``mmap`` addressed by integer: userfaultfd, KVM and the page handler all
speak in addresses, and Python's :mod:`mmap` object does not hand its address out. Reads and
writes go through ``memmove`` in a foreign call, so they release the GIL and are safe on
userfaultfd-registered memory (a fault blocks only the calling thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from types import TracebackType

from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import check_page_range, is_page_aligned, page_round_up


def _check_length(length: int) -> None:
    if length <= 0:
        raise ValueError(f"a mapping's length must be positive, got {length}")


class Mapping:
    """An owned memory mapping: anonymous, memfd-backed or over a given file descriptor.

    ``fd`` is the descriptor behind a memfd mapping (owned and closed with the mapping when
    ``owns_fd``), or None for anonymous memory.
    """

    def __init__(self, address: int, length: int, *, fd: int | None = None,
                 owns_fd: bool = False, shared: bool = False) -> None:
        self.address = address
        self.length = length
        self.fd = fd
        self.shared = shared
        self._owns_fd = owns_fd
        self._closed = False

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def anonymous(cls, length: int, *, shared: bool = False, populate: bool = False,
                  hint: int = 0) -> Mapping:
        """Private (or shared) anonymous memory, read-write, rounded up to whole pages."""
        _check_length(length)
        length = page_round_up(length)
        flags = libc.MAP_ANONYMOUS | (libc.MAP_SHARED if shared else libc.MAP_PRIVATE)
        if populate:
            flags |= libc.MAP_POPULATE
        addr = libc.mmap(hint, length, libc.PROT_READ | libc.PROT_WRITE, flags)
        return cls(addr, length, shared=shared)

    @classmethod
    def reserve(cls, length: int) -> Mapping:
        """An inaccessible placeholder, to carve aligned or adjacent mappings out of."""
        _check_length(length)
        length = page_round_up(length)
        addr = libc.mmap(0, length, libc.PROT_NONE,
                         libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE)
        return cls(addr, length)

    @classmethod
    def memfd(cls, length: int, name: str = "vmmswap", *, hint: int = 0,
              memfd_flags: int = 0) -> Mapping:
        """A new memfd of ``length`` bytes, mapped MAP_SHARED: the guest-memory layout.

        ``memfd_flags`` are added to MFD_CLOEXEC (MFD_HUGETLB | MFD_HUGE_2MB for hugetlbfs
        memory; ``length`` must then be a multiple of the huge page size).
        """
        _check_length(length)
        length = page_round_up(length)
        fd = os.memfd_create(name, libc.MFD_CLOEXEC | memfd_flags)
        try:
            os.ftruncate(fd, length)
            addr = libc.mmap(hint, length, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(addr, length, fd=fd, owns_fd=True, shared=True)

    @classmethod
    def map_fd(cls, fd: int, length: int, *, offset: int = 0, writable: bool = True,
               shared: bool = True, hint: int = 0) -> Mapping:
        """Map ``length`` bytes of an existing descriptor; the caller keeps owning ``fd``."""
        _check_length(length)
        if not is_page_aligned(offset) or offset < 0:
            raise ValueError(f"map_fd: offset {offset:#x} is not a non-negative page multiple")
        length = page_round_up(length)
        prot = libc.PROT_READ | (libc.PROT_WRITE if writable else 0)
        flags = libc.MAP_SHARED if shared else libc.MAP_PRIVATE
        addr = libc.mmap(hint, length, prot, flags, fd, offset)
        return cls(addr, length, fd=fd, owns_fd=False, shared=shared)

    # --- use ------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def end(self) -> int:
        return self.address + self.length

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError("mapping is closed")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"[{offset:#x}, {offset + length:#x}) is outside the {self.length:#x}-byte mapping"
            )

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """madvise(2) on part of the mapping.

        **Safety**: MADV_REMOVE discards the contents of the range, and so does MADV_DONTNEED
        on a private mapping (on a shared one it only drops this process's page-table entries;
        the data stays in the file). On guest memory use :meth:`GuestMemory.discard`.
        """
        if length is None:
            length = self.length - offset
        self._check(offset, length)
        check_page_range(offset, length, "madvise")
        libc.madvise(self.address + offset, length, advice)

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes out of the mapping (GIL released during the copy)."""
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Copy into ``buf`` from the mapping (GIL released during the copy)."""
        n = memoryview(buf).nbytes
        self._check(offset, n)
        if n:
            libc.memmove(libc.buffer_address(buf), self.address + offset, n)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the mapping (GIL released during the copy)."""
        n = memoryview(data).nbytes
        self._check(offset, n)
        if n:
            src, keep = libc.readonly_buffer_address(data)
            libc.memmove(self.address + offset, src, n)
            del keep

    def as_ctypes(self) -> ctypes.Array[ctypes.c_char]:
        """The mapping as a ctypes array, for zero-copy buffer use (numpy, os.pwrite).

        **Safety**: Python code that reads this buffer holds the GIL. Never use it on
        userfaultfd-registered memory.
        """
        self._check(0, 0)
        return (ctypes.c_char * self.length).from_address(self.address)

    def close(self) -> None:
        """Unmap (and close an owned memfd). Idempotent."""
        if self._closed:
            return
        self._closed = True
        libc.munmap(self.address, self.length)
        if self._owns_fd and self.fd is not None:
            os.close(self.fd)

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(OSError):
                self.close()

    def __repr__(self) -> str:
        kind = "memfd" if self.fd is not None else ("shared" if self.shared else "anonymous")
        state = " closed" if self._closed else ""
        return f"<Mapping {kind} {self.address:#x}+{self.length:#x}{state}>"
