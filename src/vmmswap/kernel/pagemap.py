"""The ``PAGEMAP_SCAN`` uAPI of Linux 6.7+ (``include/uapi/linux/fs.h``), on /proc/PID/pagemap.

The installed headers (6.1) predate it, so nothing here can be checked against them at build
time; ``tests/uffd/test_pagemap_abi.py`` checks the request number against the ``_IOC``
encoding, the struct sizes against the kernel itself (it rejects a ``size`` that is not its
own) and the category bits against what the running kernel accepts.

Why the interface matters here: with ``UFFD_FEATURE_WP_ASYNC`` the kernel resolves a write to a
write-protected page by itself (no message to the handler) and only records that the page was
written; ``PAGEMAP_SCAN`` reports those pages and can write-protect them again in the same walk,
so dirty tracking across swap cycles costs one ioctl per range instead of a fault per page.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from vmmswap.kernel.ioctl import iowr

#: ``struct pm_scan_arg``: size, flags, start, end, walk_end, vec, vec_len, max_pages,
#: category_inverted, category_mask, category_anyof_mask, return_mask (all ``__u64``).
PM_SCAN_ARG_STRUCT: Final = struct.Struct("=12Q")
#: Byte offset of ``walk_end``, the one field the kernel writes back.
PM_SCAN_ARG_WALK_END_OFFSET: Final = 32
#: ``struct page_region``: start, end (exclusive), categories.
PAGE_REGION_STRUCT: Final = struct.Struct("=QQQ")

assert PM_SCAN_ARG_STRUCT.size == 96
assert PAGE_REGION_STRUCT.size == 24

#: ``_IOWR('f', 16, struct pm_scan_arg)``.
PAGEMAP_SCAN: Final = iowr(ord("f"), 16, PM_SCAN_ARG_STRUCT.size)


class ScanFlag(enum.IntFlag, boundary=enum.KEEP):
    """``pm_scan_arg.flags``: what the walk does besides reporting."""

    #: Write-protect every page the walk matches (and reports), atomically with the report.
    WP_MATCHING = 1 << 0
    #: Stop with EPERM at the first page whose range is not registered for async WP.
    CHECK_WPASYNC = 1 << 1


class PageCategory(enum.IntFlag, boundary=enum.KEEP):
    """``PAGE_IS_*``: the categories a scan selects by and reports in ``page_region``."""

    WPALLOWED = 1 << 0  # the range is registered for async write protection
    WRITTEN = 1 << 1  # written since it was last write-protected
    FILE = 1 << 2  # file-backed (shmem counts)
    PRESENT = 1 << 3  # mapped in this process's page tables
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5  # mapped to the shared zero page
    HUGE = 1 << 6  # THP or hugetlb mapping
    SOFT_DIRTY = 1 << 7  # the soft-dirty bit (clear_refs), an older tracker
    GUARD = 1 << 8  # a guard region (MADV_GUARD_INSTALL); newer than the rest


#: The categories this module knows. A kernel rejects masks naming bits it does not know
#: (EINVAL), which is how the tests learn which of these the running kernel has.
KNOWN_CATEGORIES: Final = PageCategory(sum(PageCategory))

