"""A minimal balloon: the guest hands a range of its memory back and the VMM discards it.

The guest writes the range to four 32-bit ports and reads a fifth for the status; the VMM runs
``MADV_REMOVE`` on its mapping of the range, which punches the pages out of the region's memfd.
When vmm-swap is enabled that madvise raises a userfaultfd REMOVE event, and the monitor frees
the pages from staging and the swap file: this is how REMOVE events reach it, as with a
virtio-balloon in crosvm. Afterwards the range reads as zeros.

The madvise goes through ctypes (GIL released), so it may block until the monitor has read the
REMOVE event without stopping the VMM's other threads.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.vm import guest_abi as abi
from vmmswap.vm.layout import GuestLayout
from vmmswap.vm.machine import current_vcpu


@dataclass
class BalloonStats:
    requests: int = 0
    bytes_returned: int = 0
    refused: int = 0


class BalloonDevice:
    """Port-I/O device at :data:`~vmmswap.vm.guest_abi.BALLOON_PORT` (one latch per vCPU)."""

    def __init__(self, memory: GuestMemory, guest_layout: GuestLayout) -> None:
        self._memory = memory
        self._layout = guest_layout
        self._latches: dict[int | None, list[int]] = {}
        self._lock = threading.Lock()
        self.stats = BalloonStats()

    def io_out(self, port: int, size: int, value: int) -> None:
        reg = port - abi.BALLOON_PORT
        if size != 4 or reg not in (abi.BALLOON_ADDR_LO, abi.BALLOON_ADDR_HI,
                                    abi.BALLOON_LEN_LO, abi.BALLOON_LEN_HI):
            return
        latch = self._latches.setdefault(current_vcpu(), [0, 0, 0, 0])
        latch[reg // 4] = value & 0xFFFF_FFFF

    def io_in(self, port: int, size: int) -> int:
        if port - abi.BALLOON_PORT != abi.BALLOON_GO:
            return 0xFFFF_FFFF
        latch = self._latches.get(current_vcpu(), [0, 0, 0, 0])
        addr = latch[0] | (latch[1] << 32)
        length = latch[2] | (latch[3] << 32)
        return self.give_back(addr, length)

    def give_back(self, guest_addr: int, length: int) -> int:
        """Discard ``[guest_addr, +length)``; 0 on success, else an errno (nothing changed).

        **Safety**: the contents of the range are gone for good (MADV_REMOVE). Only the guest
        may ask for this, for memory it no longer needs; only whole pages of the data area
        qualify, so the guest cannot discard its own program, stacks or page tables.
        """
        with self._lock:
            self.stats.requests += 1
        # Whole pages of the guest's memory: 2 MiB on hugetlbfs, where the kernel frees a huge
        # page only whole (a partial discard would zero it in place and free nothing).
        page = self._memory.page_size
        if length <= 0 or guest_addr % page or length % page:
            return self._refuse(errno.EINVAL)
        try:
            start = self._layout.data_offset(guest_addr)
            self._layout.span(start, length)
            self._memory.region_of(guest_addr, length)
        except ValueError:
            return self._refuse(errno.EINVAL)
        # Safety: the guest asked for this range to be discarded; it is page aligned, inside
        # one region's data area, and the guest treats it as zero from now on.
        try:
            self._memory.discard(guest_addr, length)
        except OSError as exc:
            return self._refuse(exc.errno or errno.EIO)
        with self._lock:
            self.stats.bytes_returned += length
        return 0

    def _refuse(self, err: int) -> int:
        with self._lock:
            self.stats.refused += 1
        return err
