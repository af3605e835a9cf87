"""What the resumable contexts (trim, swap-in) see of the page handler: regions and stores.

:class:`~vmmswap.dataplane.page_handler.PageHandler` creates the contexts, so they cannot import
it without a circle. They are written against :class:`PageStore`, the handful of attributes they
use, which the handler satisfies structurally; a test can hand them any object that does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.dataplane.page_fill import Bounce, FillOutcome, MapFn, RunFiller
from vmmswap.dataplane.page_state import Journal
from vmmswap.dataplane.staging import StagingMemory
from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd

__all__ = ["InvalidAddressError", "PageStore", "Region"]


class InvalidAddressError(ValueError):
    """An address outside every guest region, or an unaligned range (crosvm: InvalidAddress).

    On the fault path the monitor treats it as fatal: a registered range the handler does not
    know means the registrations and the handler disagree.
    """


@dataclass(frozen=True, slots=True)
class Region:
    """One guest region as the handler sees it: VMM address range, memfd, first page index.

    Pages are the region's own (``page_size``: 2 MiB on hugetlbfs), the unit the kernel
    faults, fills and frees it in; page indexes count them.
    """

    spec: RegionSpec
    memfd: int
    base_page: int
    page_size: int = PAGE_SIZE

    @property
    def host_addr(self) -> int:
        return self.spec.host_addr

    @property
    def host_end(self) -> int:
        return self.spec.host_end

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def num_pages(self) -> int:
        return self.spec.size // self.page_size

    @property
    def end_page(self) -> int:
        return self.base_page + self.num_pages

    def page_of(self, addr: int) -> int:
        """The handler's page index of a VMM address inside this region (rounded down)."""
        return self.base_page + (addr - self.spec.host_addr) // self.page_size

    def addr_of(self, page: int) -> int:
        """The VMM address of one of this region's page indexes."""
        return self.spec.host_addr + (page - self.base_page) * self.page_size


class PageStore(Protocol):
    """The page handler as trim and swap-in use it.

    ``epoch`` changes at every move to staging: a context started before it restarts its scan,
    since the pages it had looked at may have moved since.
    """

    staging: StagingMemory
    swap_file: SwapFile
    bounce: Bounce
    filler: RunFiller
    num_pages: int
    #: Bytes per page index (the guest's page: one for every region).
    page_size: int
    epoch: int
    #: Maps swap-file pages for a COPY in place (huge pages), or None: read them.
    file_mapper: MapFn | None

    @property
    def journal(self) -> Journal | None:
        """Where multi-array steps are recorded for a successor (None: private state)."""

    def check_open(self) -> None:
        """Raise ValueError when the handler is closed."""

    def region_of_page(self, page: int) -> Region:
        """The region holding page index ``page``."""

    def note_file_filled(self, uffd: Userfaultfd, first: int, out: FillOutcome) -> None:
        """A fill from the swap file through ``uffd`` settled ``out.done`` pages at
        ``first``."""

    def note_swapped_in(self, pages: int) -> None:
        """Count pages brought back by swap-in."""
