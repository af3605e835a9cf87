"""The userfaultfd uAPI of Linux 6.18 (``include/uapi/linux/userfaultfd.h``).

Feature bits, register modes and the ``ioctls`` masks are :class:`enum.IntFlag` with
``boundary=KEEP``, so bits a newer kernel reports and this module does not know survive a round
trip instead of being dropped.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from vmmswap.kernel.ioctl import io, ior, iowr

UFFD_API: Final = 0xAA
UFFDIO: Final = 0xAA  # the ioctl type byte

# Flags of userfaultfd(2) and USERFAULTFD_IOC_NEW, besides O_CLOEXEC and O_NONBLOCK.
UFFD_USER_MODE_ONLY: Final = 1

# --- struct layouts (all little-endian native on the supported architectures) ------------------
UFFDIO_API_STRUCT: Final = struct.Struct("=QQQ")  # api, features, ioctls
UFFDIO_RANGE_STRUCT: Final = struct.Struct("=QQ")  # start, len
UFFDIO_REGISTER_STRUCT: Final = struct.Struct("=QQQQ")  # range.start, range.len, mode, ioctls
UFFDIO_COPY_STRUCT: Final = struct.Struct("=QQQQq")  # dst, src, len, mode, copy
UFFDIO_ZEROPAGE_STRUCT: Final = struct.Struct("=QQQq")  # range.start, range.len, mode, zeropage
UFFDIO_MOVE_STRUCT: Final = struct.Struct("=QQQQq")  # dst, src, len, mode, move
UFFDIO_WRITEPROTECT_STRUCT: Final = struct.Struct("=QQQ")  # range.start, range.len, mode
UFFDIO_CONTINUE_STRUCT: Final = struct.Struct("=QQQq")  # range.start, range.len, mode, mapped
UFFDIO_POISON_STRUCT: Final = struct.Struct("=QQQq")  # range.start, range.len, mode, updated

#: ``struct uffd_msg``: u8 event, u8/u16/u32 reserved, then a 24-byte union.
UFFD_MSG_SIZE: Final = 32
UFFD_MSG_HEADER: Final = struct.Struct("=B3x4x")
UFFD_MSG_WORDS: Final = struct.Struct("=B7xQQQ")  # event, then the union as three u64 words
UFFD_MSG_PAGEFAULT: Final = struct.Struct("=8xQQI4x")  # flags, address, feat.ptid
UFFD_MSG_FORK: Final = struct.Struct("=8xI20x")  # ufd
UFFD_MSG_REMAP: Final = struct.Struct("=8xQQQ")  # from, to, len
UFFD_MSG_REMOVE: Final = struct.Struct("=8xQQ8x")  # start, end (also UNMAP)

assert UFFD_MSG_PAGEFAULT.size == UFFD_MSG_SIZE
assert UFFD_MSG_FORK.size == UFFD_MSG_SIZE
assert UFFD_MSG_REMAP.size == UFFD_MSG_SIZE
assert UFFD_MSG_REMOVE.size == UFFD_MSG_SIZE
assert UFFD_MSG_WORDS.size == UFFD_MSG_SIZE

#: Offsets of the s64 result fields, which the kernel fills even when the ioctl fails.
UFFDIO_COPY_RESULT_OFFSET: Final = 32  # uffdio_copy.copy
UFFDIO_ZEROPAGE_RESULT_OFFSET: Final = 24  # uffdio_zeropage.zeropage
UFFDIO_MOVE_RESULT_OFFSET: Final = 32  # uffdio_move.move
UFFDIO_CONTINUE_RESULT_OFFSET: Final = 24  # uffdio_continue.mapped
UFFDIO_POISON_RESULT_OFFSET: Final = 24  # uffdio_poison.updated
UFFDIO_RESULT_FIELD: Final = struct.Struct("=q")

#: The largest ioctl argument struct; one buffer of this size fits every uffd ioctl.
UFFDIO_MAX_STRUCT_SIZE: Final = max(s.size for s in (
    UFFDIO_API_STRUCT, UFFDIO_RANGE_STRUCT, UFFDIO_REGISTER_STRUCT, UFFDIO_COPY_STRUCT,
    UFFDIO_ZEROPAGE_STRUCT, UFFDIO_MOVE_STRUCT, UFFDIO_WRITEPROTECT_STRUCT,
    UFFDIO_CONTINUE_STRUCT, UFFDIO_POISON_STRUCT))

# --- ioctl numbers -------------------------------------------------------------------------------
_UFFDIO_REGISTER: Final = 0x00
_UFFDIO_UNREGISTER: Final = 0x01
_UFFDIO_WAKE: Final = 0x02
_UFFDIO_COPY: Final = 0x03
_UFFDIO_ZEROPAGE: Final = 0x04
_UFFDIO_MOVE: Final = 0x05
_UFFDIO_WRITEPROTECT: Final = 0x06
_UFFDIO_CONTINUE: Final = 0x07
_UFFDIO_POISON: Final = 0x08
_UFFDIO_API: Final = 0x3F

UFFDIO_API_IOCTL: Final = iowr(UFFDIO, _UFFDIO_API, UFFDIO_API_STRUCT.size)
UFFDIO_REGISTER: Final = iowr(UFFDIO, _UFFDIO_REGISTER, UFFDIO_REGISTER_STRUCT.size)
# UNREGISTER and WAKE are _IOR for historical reasons although the kernel only reads the range.
UFFDIO_UNREGISTER: Final = ior(UFFDIO, _UFFDIO_UNREGISTER, UFFDIO_RANGE_STRUCT.size)
UFFDIO_WAKE: Final = ior(UFFDIO, _UFFDIO_WAKE, UFFDIO_RANGE_STRUCT.size)
UFFDIO_COPY: Final = iowr(UFFDIO, _UFFDIO_COPY, UFFDIO_COPY_STRUCT.size)
UFFDIO_ZEROPAGE: Final = iowr(UFFDIO, _UFFDIO_ZEROPAGE, UFFDIO_ZEROPAGE_STRUCT.size)
UFFDIO_MOVE: Final = iowr(UFFDIO, _UFFDIO_MOVE, UFFDIO_MOVE_STRUCT.size)
UFFDIO_WRITEPROTECT: Final = iowr(UFFDIO, _UFFDIO_WRITEPROTECT, UFFDIO_WRITEPROTECT_STRUCT.size)
UFFDIO_CONTINUE: Final = iowr(UFFDIO, _UFFDIO_CONTINUE, UFFDIO_CONTINUE_STRUCT.size)
UFFDIO_POISON: Final = iowr(UFFDIO, _UFFDIO_POISON, UFFDIO_POISON_STRUCT.size)

#: ``/dev/userfaultfd``'s ioctl (Linux 6.1): a "bad" ``_IO`` that still takes an int argument.
USERFAULTFD_IOC: Final = 0xAA
USERFAULTFD_IOC_NEW: Final = io(USERFAULTFD_IOC, 0x00)

USERFAULTFD_DEVICE: Final = "/dev/userfaultfd"


class Feature(enum.IntFlag, boundary=enum.KEEP):
    """``uffdio_api.features`` bits."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


#: The Linux release that introduced each feature bit (for error messages on older kernels).
FEATURE_SINCE: Final[dict[Feature, str]] = {
    Feature.PAGEFAULT_FLAG_WP: "5.7",
    Feature.EVENT_FORK: "4.11",
    Feature.EVENT_REMAP: "4.11",
    Feature.EVENT_REMOVE: "4.11",
    Feature.MISSING_HUGETLBFS: "4.11",
    Feature.MISSING_SHMEM: "4.11",
    Feature.EVENT_UNMAP: "4.11",
    Feature.SIGBUS: "4.14",
    Feature.THREAD_ID: "4.14",
    Feature.MINOR_HUGETLBFS: "5.13",
    Feature.MINOR_SHMEM: "5.14",
    Feature.EXACT_ADDRESS: "5.18",
    Feature.WP_HUGETLBFS_SHMEM: "5.19",
    Feature.WP_UNPOPULATED: "6.4",
    Feature.POISON: "6.6",
    Feature.WP_ASYNC: "6.7",
    Feature.MOVE: "6.8",
}

#: Every feature bit this module knows.
KNOWN_FEATURES: Final = Feature(sum(FEATURE_SINCE))


class RegisterMode(enum.IntFlag, boundary=enum.KEEP):
    """``uffdio_register.mode``: which faults a range reports. Modes combine."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class Ioctls(enum.IntFlag, boundary=enum.KEEP):
    """The ``ioctls`` masks: one bit per ioctl nr, as UFFDIO_API and UFFDIO_REGISTER report."""

    REGISTER = 1 << _UFFDIO_REGISTER
    UNREGISTER = 1 << _UFFDIO_UNREGISTER
    WAKE = 1 << _UFFDIO_WAKE
    COPY = 1 << _UFFDIO_COPY
    ZEROPAGE = 1 << _UFFDIO_ZEROPAGE
    MOVE = 1 << _UFFDIO_MOVE
    WRITEPROTECT = 1 << _UFFDIO_WRITEPROTECT
    CONTINUE = 1 << _UFFDIO_CONTINUE
    POISON = 1 << _UFFDIO_POISON
    API = 1 << _UFFDIO_API


#: What UFFDIO_API reports: the descriptor-level ioctls.
UFFD_API_IOCTLS: Final = Ioctls.REGISTER | Ioctls.UNREGISTER | Ioctls.API
#: Every range ioctl (what REGISTER reports for anonymous and shmem ranges, before the kernel
#: clears WRITEPROTECT without MODE_WP and CONTINUE without MODE_MINOR).
UFFD_API_RANGE_IOCTLS: Final = (Ioctls.WAKE | Ioctls.COPY | Ioctls.ZEROPAGE | Ioctls.MOVE
                                | Ioctls.WRITEPROTECT | Ioctls.CONTINUE | Ioctls.POISON)
#: What REGISTER reports for hugetlb ranges: no ZEROPAGE, no MOVE.
UFFD_API_RANGE_IOCTLS_BASIC: Final = (Ioctls.WAKE | Ioctls.COPY | Ioctls.WRITEPROTECT
                                      | Ioctls.CONTINUE | Ioctls.POISON)


# Mode bits of the range ioctls.
UFFDIO_COPY_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_COPY_MODE_WP: Final = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_MOVE_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: Final = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP: Final = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE: Final = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_CONTINUE_MODE_WP: Final = 1 << 1
UFFDIO_POISON_MODE_DONTWAKE: Final = 1 << 0

#: The register-mode bits this module knows; REGISTER rejects others (and mode 0) with EINVAL.
KNOWN_REGISTER_MODES: Final = RegisterMode.MISSING | RegisterMode.WP | RegisterMode.MINOR

#: /proc/PID/pagemap entry bit: the page (or its PTE marker) is uffd write-protected (5.7+).
PM_UFFD_WP: Final = 1 << 57


class EventType(enum.IntEnum):
    """``uffd_msg.event``. Codes start at 0x12 on purpose, to catch garbage."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class PagefaultFlag(enum.IntFlag, boundary=enum.KEEP):
    """``uffd_msg.arg.pagefault.flags``. Neither WP nor MINOR means a MISSING fault."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2
