"""A small, honest page handler for control-plane tests, loaded into the monitor through
``VMMSWAP_TEST_HANDLER_FACTORY=control_fake_handler:factory``.

It keeps staging pages in a dict and writes "swapped" pages to the real swap file, so the
control plane can be tested end to end (data really leaves guest memory and really comes back)
independently of the data plane. Fault injection through environment variables:

* ``FAKE_FAIL_OUT_AFTER=N``: swap_out raises EIO after N successful chunks;
* ``FAKE_FAIL_MOVE=1``: move_to_staging raises EIO after moving half of the pages;
* ``FAKE_SLOW_MOVE=seconds``: sleep that long inside the move (freeze tests).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vmmswap.control.monitor_resume import HandlerSetup, NotResumableError
from vmmswap.dataplane.guest_memory import RegionSpec, data_ranges
from vmmswap.kernel import libc
from vmmswap.uffd.errors import PageExistsError
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, page_base
from vmmswap.uffd.userfaultfd import Userfaultfd


@dataclass
class FakeMetrics:
    resident_pages: int = 0
    copied_from_file_pages: int = 0
    copied_from_staging_pages: int = 0
    zeroed_pages: int = 0
    redundant_pages: int = 0
    staging_pages: int = 0
    swap_pages: int = 0
    readahead_pages: int = 0
    faults_avoided: int = 0


class FakeTrim:
    def __init__(self, handler: FakeHandler) -> None:
        self.handler = handler
        self.todo = sorted(handler.staging)

    def trim_pages(self, max_pages: int = 1024) -> int | None:
        if not self.todo:
            return None
        batch, self.todo = self.todo[:max_pages], self.todo[max_pages:]
        trimmed = 0
        for page in batch:
            data = self.handler.staging.get(page)
            if data is not None and not data.strip(b"\0"):
                del self.handler.staging[page]
                trimmed += 1
        return trimmed


class FakeSwapIn:
    def __init__(self, handler: FakeHandler) -> None:
        self.handler = handler

    def swap_in(self, uffd: Userfaultfd, max_bytes: int = 2 << 20) -> int:
        h = self.handler
        pages = [*sorted(h.staging), *sorted(h.file_slots)][: max_bytes // PAGE_SIZE]
        for page in pages:
            data = h.take(page)
            if data is None:
                continue
            with contextlib.suppress(PageExistsError):
                uffd.copy(page, PAGE_SIZE, data, wake=False)
        return len(pages)

    def close(self) -> None:
        pass


class FakeHandler:
    def __init__(self, regions: Sequence[tuple[RegionSpec, int]], swap_fd: int) -> None:
        self.regions = [(spec, fd, Mapping.map_fd(fd, spec.size)) for spec, fd in regions]
        self.swap_fd = swap_fd
        self.staging: dict[int, bytes] = {}
        self.file_slots: dict[int, int] = {}
        self.next_slot = 0
        self.m = FakeMetrics()
        self.out_chunks = 0
        self.fail_out_after = int(os.environ.get("FAKE_FAIL_OUT_AFTER", "-1"))

    def _region(self, addr: int) -> tuple[RegionSpec, int, Mapping]:
        for spec, fd, mapping in self.regions:
            if spec.host_addr <= addr < spec.host_end:
                return spec, fd, mapping
        raise ValueError(f"the address is invalid {addr:#018x}")

    def move_to_staging(self) -> int:
        moved = 0
        self.m = FakeMetrics()
        fail = os.environ.get("FAKE_FAIL_MOVE") == "1"
        time.sleep(float(os.environ.get("FAKE_SLOW_MOVE", "0")))
        for spec, fd, mapping in self.regions:
            for start, end in list(data_ranges(fd, spec.size)):
                for off in range(start, end, PAGE_SIZE):
                    if fail and moved >= 8:
                        raise OSError(errno.EIO, "injected move failure")
                    addr = spec.host_addr + off
                    self.staging[addr] = mapping.read(off, PAGE_SIZE)
                    self.file_slots.pop(addr, None)
                    libc.fallocate(fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE,
                                   off, PAGE_SIZE)
                    moved += 1
        return moved

    def take(self, page: int) -> bytes | None:
        if page in self.staging:
            return self.staging.pop(page)
        slot = self.file_slots.pop(page, None)
        if slot is not None:
            return os.pread(self.swap_fd, PAGE_SIZE, slot * PAGE_SIZE)
        return None

    def handle_page_fault(self, uffd: Userfaultfd, addr: int, write: bool = False) -> None:
        page = page_base(addr)
        self._region(page)
        from_staging = page in self.staging
        data = self.take(page)
        try:
            if data is None:
                uffd.zero(page, PAGE_SIZE)
                self.m.zeroed_pages += 1
            else:
                uffd.copy(page, PAGE_SIZE, data)
                if from_staging:
                    self.m.copied_from_staging_pages += 1
                else:
                    self.m.copied_from_file_pages += 1
        except PageExistsError:
            uffd.wake(page, PAGE_SIZE)
            self.m.redundant_pages += 1

    def handle_remove(self, start: int, end: int) -> None:
        for page in range(start, end, PAGE_SIZE):
            self.staging.pop(page, None)
            self.file_slots.pop(page, None)

    def start_trim(self) -> FakeTrim:
        return FakeTrim(self)

    def swap_out(self, max_bytes: int = 2 << 20) -> int:
        pages = sorted(self.staging)[: max_bytes // PAGE_SIZE]
        if not pages:
            return 0
        if self.out_chunks == self.fail_out_after:
            raise OSError(errno.EIO, "injected I/O error")
        for page in pages:
            slot = self.next_slot
            os.pwrite(self.swap_fd, self.staging[page], slot * PAGE_SIZE)  # ENOSPC: no change
            self.next_slot += 1
            self.file_slots[page] = slot
            del self.staging[page]
        self.out_chunks += 1
        return len(pages)

    def start_swap_in(self) -> FakeSwapIn:
        return FakeSwapIn(self)

    def metrics(self) -> FakeMetrics:
        self.m.staging_pages = len(self.staging)
        self.m.swap_pages = len(self.file_slots)
        return self.m

    def close(self) -> None:
        for _, _, mapping in self.regions:
            mapping.close()


def factory(setup: HandlerSetup) -> FakeHandler:
    """A fresh fake handler. Its staging lives in this process only, so a successor monitor
    cannot take it over (NotResumableError), like a data plane without page state."""
    if setup.resume:
        raise NotResumableError("the fake handler keeps its pages in the dead monitor")
    return FakeHandler(setup.regions, setup.swap_fd)
