"""``PAGEMAP_SCAN`` on /proc/PID/pagemap: which pages of a range were written, present, ...

A :class:`Pagemap` is a descriptor type that is a file (``fileno``, ``close``, a context
manager), opened close-on-exec on one process's pagemap. :meth:`Pagemap.scan` is one ioctl: it
fills a caller-sized array of page regions and says where the walk stopped, because the kernel
stops early when the array is full or ``max_pages`` pages were reported. :class:`WrittenScan`
is the resumable form for dirty tracking: a context object with a cursor that turns the regions
into one bit per page, step by step, so a caller that must also serve faults can bound each step.

Why per process: the kernel keeps the written state in *page table entries*. A guest page
written through a device process's mapping of the guest memfd is recorded in that process's page
tables only, and a write through the file (``pwrite``) in no page table at all. A dirty tracker
must scan every process that maps guest memory and must not let anyone write it through the file.

**Safety**: a scan with ``write_protect`` re-protects exactly the pages it reports. A page that
the walk did not reach (array full, ``max_pages``) keeps its written state for the next scan, so
a partial scan never loses a dirty page as long as the caller continues from ``walk_end``.
"""

from __future__ import annotations

import errno
import fcntl
import os
from types import TracebackType
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from vmmswap.kernel import pagemap as abi
from vmmswap.kernel.pagemap import KNOWN_CATEGORIES, PageCategory, ScanFlag
from vmmswap.uffd.pagesize import PAGE_SIZE, is_page_aligned

#: ``struct page_region`` as a numpy record, so results are array slots, not Python objects.
REGION_DTYPE: Final = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])
assert REGION_DTYPE.itemsize == abi.PAGE_REGION_STRUCT.size

#: Regions one scan fills by default: 12 KiB of results, adjacent pages merge into one region.
DEFAULT_REGIONS: Final = 512

NO_CATEGORIES: Final = PageCategory(0)


class ScanResult(NamedTuple):
    """One scan: the regions filled (a view of the caller's array) and where the walk ended."""

    regions: npt.NDArray[np.void]
    walk_end: int
    end: int

    @property
    def complete(self) -> bool:
        """True when the walk covered the whole range (``walk_end == end``)."""
        return self.walk_end >= self.end


def _check_categories(name: str, mask: int) -> PageCategory:
    unknown = mask & ~int(KNOWN_CATEGORIES)
    if mask < 0 or unknown:
        raise ValueError(f"{name}: unknown page categories {unknown:#x}")
    return PageCategory(mask)


class Pagemap:
    """One process's ``/proc/PID/pagemap``, opened for ``PAGEMAP_SCAN`` (Linux 6.7+)."""

    def __init__(self, fd: int, pid: int) -> None:
        self._fd = fd
        self.pid = pid

    @classmethod
    def open(cls, pid: int | None = None) -> Pagemap:
        """Open the pagemap of ``pid`` (this process when None), close-on-exec.

        Reading another process's page tables needs ptrace read access to it (same user and
        not made undumpable, or CAP_SYS_PTRACE)."""
        target = os.getpid() if pid is None else pid
        if target <= 0:
            raise ValueError(f"a pid must be positive, got {target}")
        try:
            fd = os.open(f"/proc/{target}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, f"process {target} is gone: no pagemap to "
                                     "scan") from None
        return cls(fd, target)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the pagemap is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Pagemap:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return f"Pagemap(pid={self.pid}, fd={self._fd})"

    @staticmethod
    def regions(count: int = DEFAULT_REGIONS) -> npt.NDArray[np.void]:
        """A result array for :meth:`scan`, reusable across scans."""
        if count <= 0:
            raise ValueError(f"a result array needs at least one region, got {count}")
        return np.zeros(count, dtype=REGION_DTYPE)

    def scan(self, start: int, end: int, out: npt.NDArray[np.void], *,
             require: int = 0, anyof: int = 0, inverted: int = 0,
             report: int = KNOWN_CATEGORIES, write_protect: bool = False,
             check_wp_async: bool = False, max_pages: int = 0) -> ScanResult:
        """One ``PAGEMAP_SCAN`` over ``[start, end)`` of the process's address space.

        A page matches when it has every category of ``require`` and, if ``anyof`` is given,
        at least one of those (a category in ``inverted`` matches when the page *lacks* it).
        Matching pages are reported in ``out`` with their ``report`` categories, adjacent
        pages with equal categories merged into one region. With ``write_protect`` the matched
        pages are write-protected again in the same walk (async-WP ranges only); with
        ``check_wp_async`` the scan fails with EPERM at a page outside such a range.
        ``max_pages`` (0: no limit) caps the pages reported. The walk stops early when ``out``
        is full or the cap is reached: continue from ``result.walk_end``.

        Bad arguments raise ValueError before the kernel sees them (nothing is protected).
        """
        if not (is_page_aligned(start) and is_page_aligned(end)):
            raise ValueError(f"scan range [{start:#x}, {end:#x}) is not page aligned")
        if end < start or start < 0:
            raise ValueError(f"scan range [{start:#x}, {end:#x}) is inverted")
        if max_pages < 0:
            raise ValueError(f"max_pages must be >= 0, got {max_pages}")
        if out.dtype != REGION_DTYPE or out.ndim != 1 or len(out) == 0 \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writable, contiguous array from Pagemap.regions()")
        masks = [_check_categories(name, mask) for name, mask in
                 (("require", require), ("anyof", anyof), ("inverted", inverted),
                  ("report", report))]
        flags = (ScanFlag.WP_MATCHING if write_protect else ScanFlag(0)) \
            | (ScanFlag.CHECK_WPASYNC if check_wp_async else ScanFlag(0))
        arg = bytearray(abi.PM_SCAN_ARG_STRUCT.pack(
            abi.PM_SCAN_ARG_STRUCT.size, flags, start, end, 0, out.ctypes.data, len(out),
            max_pages, masks[2], masks[0], masks[1], masks[3]))
        try:
            # fcntl.ioctl copies a small mutable argument to its stack and releases the GIL
            # around the call; the walk reads page tables and never faults on guest memory.
            filled = fcntl.ioctl(self.fileno(), abi.PAGEMAP_SCAN, arg, True)
        except OSError as err:
            raise _scan_error(err, self.pid, start, end) from None
        walk_end = int.from_bytes(arg[abi.PM_SCAN_ARG_WALK_END_OFFSET:
                                      abi.PM_SCAN_ARG_WALK_END_OFFSET + 8], "little")
        return ScanResult(out[:filled], walk_end, end)


def _scan_error(err: OSError, pid: int, start: int, end: int) -> OSError:
    where = f"PAGEMAP_SCAN of process {pid} [{start:#x}, {end:#x})"
    code = err.errno or errno.EIO
    if code == errno.ENOTTY:
        return OSError(code, f"{where}: this kernel has no PAGEMAP_SCAN (Linux 6.7+)")
    if code == errno.ESRCH:
        return ProcessLookupError(code, f"{where}: the process has exited")
    if code == errno.EPERM:
        return PermissionError(code, f"{where}: a page outside an async write-protected "
                               "range (check_wp_async)")
    return OSError(code, f"{where}: {os.strerror(code)}")


class WrittenScan:
    """Resumable search for pages written since their last write protection.

    Marks ``dirty[i]`` for every written page ``i`` of ``[start, start + len(dirty) pages)``
    (bits already set stay set) and, with ``reprotect``, protects those pages again so the
    next cycle sees only later writes. ``cursor`` is the next address to walk; :meth:`step`
    walks at most ``max_pages`` pages' worth of results and returns how many written pages it
    found, so the caller can interleave other work; ``done`` says the range is covered.
    """

    def __init__(self, pagemap: Pagemap, start: int, dirty: npt.NDArray[np.bool_], *,
                 reprotect: bool, regions: int = DEFAULT_REGIONS,
                 page_size: int = PAGE_SIZE, require: int = PageCategory.WRITTEN,
                 inverted: int = 0) -> None:
        if dirty.dtype != np.bool_ or dirty.ndim != 1:
            raise ValueError("dirty must be a one-dimensional bool array, one slot per page")
        if page_size < PAGE_SIZE or page_size % PAGE_SIZE or start % page_size:
            raise ValueError(f"page size {page_size} is not a multiple of {PAGE_SIZE} that "
                             f"{start:#x} is aligned to")
        self.pagemap = pagemap
        self.start = start
        #: Bytes per slot of ``dirty``: 2 MiB for hugetlbfs memory, written and protected whole.
        self.page_size = page_size
        self.end = start + len(dirty) * page_size
        #: What a page must have to be marked (after ``inverted`` flips bits): written, by
        #: default; ``require=PRESENT|SWAPPED, inverted=PRESENT|SWAPPED`` marks empty entries.
        self.require = require
        self.inverted = inverted
        self.cursor = start
        self.dirty = dirty
        self.reprotect = reprotect
        self.found = 0
        self._out = Pagemap.regions(regions)

    @property
    def done(self) -> bool:
        return self.cursor >= self.end

    def step(self, max_pages: int = 0) -> int:
        """Walk on from the cursor; returns the written pages this step found."""
        if self.done:
            return 0
        result = self.pagemap.scan(self.cursor, self.end, self._out,
                                   require=self.require, inverted=self.inverted,
                                   report=self.require, write_protect=self.reprotect,
                                   max_pages=max_pages)
        found = 0
        ps = self.page_size
        for start, end in zip(result.regions["start"].tolist(), result.regions["end"].tolist(),
                              strict=True):
            first = (start - self.start) // ps
            last = (end - self.start + ps - 1) // ps  # a part of a huge page is all of it
            self.dirty[first:last] = True
            found += last - first
        if result.walk_end <= self.cursor and not result.complete:
            raise OSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {self.cursor:#x}")
        self.cursor = result.walk_end
        self.found += found
        return found

    def run(self) -> int:
        """Walk to the end; returns the written pages found in all steps."""
        while not self.done:
            self.step()
        return self.found
