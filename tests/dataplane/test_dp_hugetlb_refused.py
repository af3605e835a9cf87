"""hugetlbfs guest memory is refused by the page handler until the data plane works in 2 MiB
units: the kernel fills, zero-fills and punches hugetlb memory only whole huge pages at a time
(and ignores an unaligned punch), so 4 KiB handling there would lose pages silently."""

from __future__ import annotations

import pytest

from huge_settings import HugeSettings
from vmmswap.dataplane.guest_memory import HUGETLB_2M_SIZE, Backing, GuestMemory
from vmmswap.dataplane.page_handler import PageHandler


def test_hugetlb_backed_memory_is_refused_with_a_clear_error(
        huge_settings: HugeSettings, tmp_path: object) -> None:
    huge_settings.reserve_hugetlb(2)
    memory = GuestMemory.create([(0, 2 * HUGETLB_2M_SIZE)], backing=Backing.HUGETLB_2M)
    try:
        assert memory.page_size == HUGETLB_2M_SIZE  # the backing really is hugetlbfs
        regions = list(zip(memory.specs(), memory.memfds(), strict=True))
        with pytest.raises(ValueError, match="2048 KiB huge pages"):
            PageHandler.create(regions, str(tmp_path))
    finally:
        memory.close()


def test_small_page_memory_is_accepted(tmp_path: object) -> None:
    """The control: the same call on 4 KiB memory builds a handler."""
    memory = GuestMemory.create([(0, 2 * HUGETLB_2M_SIZE)])
    try:
        regions = list(zip(memory.specs(), memory.memfds(), strict=True))
        PageHandler.create(regions, str(tmp_path)).close()
    finally:
        memory.close()
