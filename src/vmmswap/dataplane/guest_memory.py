"""Guest memory: one or more regions, each a memfd mapped MAP_SHARED in the VMM.

This is the layout crosvm uses. The monitor maps the same memfds to move pages to staging and to
count resident pages, while the VMM's mapping (the one KVM and the devices touch) is the one
registered with userfaultfd.

**Safety rule**: the monitor's own mapping of guest memory is *not* registered with userfaultfd.
Reading a hole through it makes the kernel allocate a zero page in the shared file, after which
the VMM's access no longer faults and the guest silently sees zeros. Only read guest memory at
ranges the file reports as data (SEEK_DATA / SEEK_HOLE), and only while the guest's processes are
frozen.

**Backings** (:class:`Backing`): small pages (the default), transparent huge pages (shmem THP,
asked for with MADV_HUGEPAGE on the VMM's mapping; the kernel forms them only when
``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` allows it), or hugetlbfs (a memfd with
MFD_HUGETLB | MFD_HUGE_2MB). A hugetlbfs region's *page* is the huge page: the kernel faults,
fills and discards it only whole, so every region and discard must be aligned to it.
"""

from __future__ import annotations

import enum
import errno
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from vmmswap.kernel import libc
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, check_page_range

#: Called with ``(host_addr, length)`` before a discard's madvise; what it returns (if not
#: None) is called after it, with whether the madvise succeeded.
DiscardHook = Callable[[int, int], "Callable[[bool], None] | None"]
#: The huge page size of :attr:`Backing.HUGETLB_2M` (the memfd flag carries its log2).
HUGETLB_2M_SIZE: Final = 1 << (libc.MFD_HUGE_2MB >> libc.MFD_HUGE_SHIFT)
#: The st_blocks unit of fstat (POSIX: 512-byte blocks).
_STAT_BLOCK: Final = 512


class Backing(enum.Enum):
    """What backs guest memory: the page the kernel maps, faults and frees."""

    SMALL = "4k"
    #: Shmem transparent huge pages: MADV_HUGEPAGE on the mapping; faults stay 4 KiB.
    THP = "thp"
    #: hugetlbfs, 2 MiB pages: faults, fills and discards are whole 2 MiB pages.
    HUGETLB_2M = "2M"

    @property
    def page_size(self) -> int:
        """The unit faults are resolved and discards made in."""
        return HUGETLB_2M_SIZE if self is Backing.HUGETLB_2M else PAGE_SIZE


def memfd_page_size(fd: int) -> int:
    """The page size of a memfd: the huge page size for hugetlbfs, else the base page size.

    The file system decides (statfs magic), not the block size alone: hugetlbfs reports its
    page size as the block size, but so does shmem (2 MiB) whenever shmem THP is enabled, and
    THP-backed shmem is still handled in 4 KiB pages.
    """
    if libc.fs_type(fd) != libc.HUGETLBFS_MAGIC:
        return PAGE_SIZE
    return max(os.fstat(fd).st_blksize, PAGE_SIZE)


def check_aligned(addr: int, length: int, page_size: int, what: str) -> None:
    """Raise ValueError unless ``[addr, addr + length)`` (already a valid page range: callers
    check that first) is ``page_size`` aligned: a huge-page region or discard must never cut a
    huge page."""
    if addr % page_size or length % page_size:
        raise ValueError(f"{what}: [{addr:#x}, {addr + length:#x}) is not aligned to the "
                         f"{page_size // 1024} KiB huge page of its memory")


class RegionOverlapError(ValueError):
    """Two guest-memory regions overlap (in guest-physical or host-virtual space)."""


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """Where one region lives: what the monitor needs besides the memfd itself."""

    guest_addr: int
    host_addr: int
    size: int

    @property
    def host_end(self) -> int:
        return self.host_addr + self.size

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.size


def validate_regions(specs: Sequence[RegionSpec]) -> None:
    """Raise ValueError if a region is unaligned or empty, RegionOverlapError if two overlap."""
    for spec in specs:
        check_page_range(spec.guest_addr, spec.size, "guest region")
        check_page_range(spec.host_addr, spec.size, "host region")
    for space, start, end in (("host", "host_addr", "host_end"),
                              ("guest", "guest_addr", "guest_end")):
        ordered = sorted(specs, key=lambda s: getattr(s, start))
        for a, b in itertools.pairwise(ordered):
            if getattr(b, start) < getattr(a, end):
                raise RegionOverlapError(
                    f"{space} ranges overlap: [{getattr(a, start):#x}, {getattr(a, end):#x}) and "
                    f"[{getattr(b, start):#x}, {getattr(b, end):#x})"
                )


class GuestRegion:
    """One region: a memfd and its MAP_SHARED mapping in this process."""

    def __init__(self, guest_addr: int, mapping: Mapping) -> None:
        if mapping.fd is None:
            raise ValueError("a guest region must be memfd-backed")
        self.guest_addr = guest_addr
        self.mapping = mapping
        #: Bytes the kernel faults, fills and discards at a time (2 MiB on hugetlbfs); fixed
        #: for the memfd's life, so asked of the kernel once.
        self.page_size = memfd_page_size(mapping.fd)

    @property
    def size(self) -> int:
        return self.mapping.length

    @property
    def host_addr(self) -> int:
        return self.mapping.address

    @property
    def memfd(self) -> int:
        fd = self.mapping.fd
        assert fd is not None
        return fd

    @property
    def spec(self) -> RegionSpec:
        return RegionSpec(self.guest_addr, self.host_addr, self.size)

    def __repr__(self) -> str:
        return (f"<GuestRegion guest {self.guest_addr:#x}+{self.size:#x} "
                f"host {self.host_addr:#x} memfd {self.mapping.fd}>")


class GuestMemory:
    """All of a VM's guest memory."""

    def __init__(self, regions: Sequence[GuestRegion]) -> None:
        validate_regions([r.spec for r in regions])
        sizes = {r.page_size for r in regions}
        if len(sizes) > 1:
            raise ValueError(f"guest regions mix page sizes {sorted(sizes)}: one backing per VM")
        self.regions = tuple(sorted(regions, key=lambda r: r.guest_addr))
        self._discard_hook: DiscardHook | None = None

    @classmethod
    def create(cls, layout: Sequence[tuple[int, int]], name: str = "guest memory", *,
               backing: Backing = Backing.SMALL) -> GuestMemory:
        """One memfd per ``(guest_addr, size)`` region, each mapped MAP_SHARED.

        With :attr:`Backing.HUGETLB_2M` every address and size must be 2 MiB aligned, and the
        huge pages must be reserved (``/proc/sys/vm/nr_hugepages``): mapping reserves them, so
        a shortage is an error here, not a SIGBUS in the guest later.
        """
        if not layout:
            raise ValueError("guest memory needs at least one region")
        # Checked before anything is allocated; the host side is checked again once mapped.
        validate_regions([RegionSpec(g, g, s) for g, s in layout])
        if backing is Backing.HUGETLB_2M:
            for guest_addr, size in layout:
                check_aligned(guest_addr, size, HUGETLB_2M_SIZE, "hugetlbfs guest region")
        flags = libc.MFD_HUGETLB | libc.MFD_HUGE_2MB if backing is Backing.HUGETLB_2M else 0
        regions: list[GuestRegion] = []
        try:
            for i, (guest_addr, size) in enumerate(layout):
                try:
                    mapping = Mapping.memfd(size, f"{name} {i}", memfd_flags=flags)
                except OSError as err:
                    if backing is Backing.HUGETLB_2M and err.errno == errno.ENOMEM:
                        raise OSError(err.errno, f"cannot reserve {size // HUGETLB_2M_SIZE} "
                                      "huge pages of 2 MiB for guest memory (see "
                                      "/proc/sys/vm/nr_hugepages)") from err
                    raise
                regions.append(GuestRegion(guest_addr, mapping))
                if backing is Backing.THP:
                    # The kernel aligns large shmem mappings to the huge page; the advice lets
                    # faults allocate huge pages when shmem_enabled is "advise".
                    mapping.madvise(libc.MADV_HUGEPAGE)
            return cls(regions)
        except BaseException:
            for region in regions:
                region.mapping.close()
            raise

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def page_size(self) -> int:
        """The page of every region (one backing per VM; mixed backings are refused)."""
        return self.regions[0].page_size

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(self.regions)

    def specs(self) -> list[RegionSpec]:
        return [r.spec for r in self.regions]

    def memfds(self) -> list[int]:
        return [r.memfd for r in self.regions]

    def region_of(self, guest_addr: int, length: int = 1) -> GuestRegion:
        """The region holding ``[guest_addr, guest_addr + length)``; ValueError if none does."""
        for region in self.regions:
            if region.guest_addr <= guest_addr and guest_addr + length <= (
                region.guest_addr + region.size
            ):
                return region
        raise ValueError(f"guest range [{guest_addr:#x}, {guest_addr + length:#x}) "
                         "is not inside one region")

    def host_address(self, guest_addr: int) -> int:
        region = self.region_of(guest_addr)
        return region.host_addr + guest_addr - region.guest_addr

    def write(self, guest_addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy into guest memory (GIL released: safe even if the range is registered)."""
        region = self.region_of(guest_addr, max(1, memoryview(data).nbytes))
        region.mapping.write(guest_addr - region.guest_addr, data)

    def read(self, guest_addr: int, length: int) -> bytes:
        """Copy out of guest memory (GIL released: safe even if the range is registered)."""
        region = self.region_of(guest_addr, max(1, length))
        return region.mapping.read(guest_addr - region.guest_addr, length)

    def discard(self, guest_addr: int, length: int) -> None:
        """Give ``[guest_addr, +length)`` back to the host (a balloon's inflate): the pages
        read as zeros afterwards. The one way guest pages should leave while vmm-swap may be
        enabled; ValueError on an unaligned range or one not inside a single region.

        Why MADV_REMOVE and nothing else: the monitor sees every discard as the same
        UFFD_EVENT_REMOVE and drops its staged or swapped copy. MADV_REMOVE punches the pages
        out of the memfd, so that is right; MADV_DONTNEED / MADV_FREE on this MAP_SHARED memory
        keep the data in the memfd, and the monitor dropping its copy would turn a page that
        should still hold data into zeros.

        **Safety**: the contents are gone for good; only memory the guest gave up qualifies.
        """
        check_page_range(guest_addr, length, "discard")
        region = self.region_of(guest_addr, length)
        # Removing part of a huge page would zero it in place: the guest keeps the page.
        check_aligned(guest_addr, length, region.page_size, "discard")
        hook = self._discard_hook
        after = None
        if hook is not None:
            # Written down before it happens: a monitor that dies after reading the REMOVE
            # event but before applying it leaves the mark for its successor (discard_log).
            after = hook(region.host_addr + guest_addr - region.guest_addr, length)
        try:
            region.mapping.madvise(libc.MADV_REMOVE, guest_addr - region.guest_addr, length)
        except BaseException:
            if after is not None:
                after(False)
            raise
        if after is not None:
            after(True)

    def set_discard_hook(self, hook: DiscardHook | None) -> None:
        """Call ``hook(host_addr, length)`` before every :meth:`discard` (the page state's
        ``DiscardLog.announce``, so a successor monitor learns of a discard its predecessor
        read but never applied), and what it returns (if not None) after the madvise, told
        whether the madvise succeeded. None removes it."""
        self._discard_hook = hook

    def resident_bytes(self) -> int:
        """Bytes of data (not holes) in the memfds (see :func:`resident_bytes`)."""
        return sum(resident_bytes(r.memfd, r.size, r.page_size) for r in self.regions)

    def close(self) -> None:
        for region in self.regions:
            region.mapping.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def data_ranges(fd: int, size: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """The ``(offset, end)`` data extents of a file within ``[start, size)``.

    Cost follows the number of extents, not the file size: this is how resident guest memory is
    found without touching (and so without allocating) any hole.
    """
    offset = start
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == 6:  # ENXIO: no data past offset
                return
            raise
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole
        offset = hole


def data_bytes(fd: int, size: int) -> int:
    """Bytes of data in ``[0, size)`` of a file."""
    return sum(end - start for start, end in data_ranges(fd, size))


def resident_bytes(fd: int, size: int, page_size: int) -> int:
    """Bytes of ``[0, size)`` of a guest memfd that hold pages (not holes).

    SEEK_DATA/SEEK_HOLE for small pages. hugetlbfs (``page_size`` above 4 KiB) reports the
    whole file as data, holes included, but counts every huge page it adds or removes in
    ``st_blocks``: exact for a memfd that is all one region, which is how guest memory makes
    them (a region shorter than its memfd is capped at its size).
    """
    if page_size == PAGE_SIZE:
        return data_bytes(fd, size)
    return min(os.fstat(fd).st_blocks * _STAT_BLOCK, size)
