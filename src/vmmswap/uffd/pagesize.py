"""Page math.

Every conversion between bytes, pages and addresses goes through a named function here, so a
reader never has to decode an inline shift. Page indexes are relative to whatever the caller
counts from (a region, the staging memfd, the swap file); these helpers do not care.
"""

from __future__ import annotations

import logging
import mmap
from functools import cache
from pathlib import Path
from typing import Final

_log = logging.getLogger(__name__)

PAGE_SIZE: Final = mmap.PAGESIZE
if PAGE_SIZE & (PAGE_SIZE - 1):
    raise RuntimeError(f"page size {PAGE_SIZE} is not a power of two")
PAGE_SHIFT: Final = PAGE_SIZE.bit_length() - 1
PAGE_MASK: Final = PAGE_SIZE - 1

_THP_SIZE_PATH: Final = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
_THP_FALLBACK: Final = 2 * 1024 * 1024


@cache
def thp_size() -> int:
    """The transparent huge page (PMD) size, read once from sysfs; 2 MiB where it is absent."""
    try:
        size = int(_THP_SIZE_PATH.read_text().strip())
    except (OSError, ValueError):
        _log.info("cannot read %s; assuming 2 MiB huge pages", _THP_SIZE_PATH)
        return _THP_FALLBACK
    if size <= 0 or size & (size - 1) or size % PAGE_SIZE:
        _log.info("odd huge page size %d; assuming 2 MiB", size)
        return _THP_FALLBACK
    return size


THP_SIZE: Final = thp_size()


def bytes_to_pages(size: int) -> int:
    """Whole pages in ``size`` bytes (rounds down)."""
    return size >> PAGE_SHIFT


def bytes_to_pages_round_up(size: int) -> int:
    """Pages needed to hold ``size`` bytes (rounds up)."""
    return (size + PAGE_MASK) >> PAGE_SHIFT


def pages_to_bytes(pages: int) -> int:
    """Bytes in ``pages`` pages."""
    return pages << PAGE_SHIFT


def addr_to_page_idx(addr: int) -> int:
    """The global page index of an address (address divided by the page size)."""
    return addr >> PAGE_SHIFT


def page_idx_to_addr(idx: int) -> int:
    """The address of the first byte of global page ``idx``."""
    return idx << PAGE_SHIFT


def page_base(addr: int) -> int:
    """The address rounded down to its page."""
    return addr & ~PAGE_MASK


def page_round_up(size: int) -> int:
    """``size`` rounded up to a whole number of pages."""
    return (size + PAGE_MASK) & ~PAGE_MASK


def is_page_aligned(value: int) -> bool:
    """Whether an address or a size is a multiple of the page size."""
    return value & PAGE_MASK == 0


def is_hugepage_aligned(value: int) -> bool:
    """Whether an address or a size is a multiple of the THP size."""
    return value & (THP_SIZE - 1) == 0


def hugepage_round_up(value: int) -> int:
    """``value`` rounded up to the THP size."""
    return (value + THP_SIZE - 1) & ~(THP_SIZE - 1)


def hugepage_round_down(value: int) -> int:
    """``value`` rounded down to the THP size."""
    return value & ~(THP_SIZE - 1)


def check_page_range(addr: int, length: int, what: str = "range") -> None:
    """Raise ValueError unless ``[addr, addr + length)`` is non-empty and page aligned."""
    if length <= 0:
        raise ValueError(f"{what}: length must be positive, got {length}")
    if not is_page_aligned(addr) or not is_page_aligned(length):
        raise ValueError(
            f"{what}: [{addr:#x}, {addr + length:#x}) is not aligned to the {PAGE_SIZE}-byte page"
        )
