"""Model-based test: random interleavings of guest writes and the handler's operations,
checked page by page against a plain reference copy of guest memory.

Invariant after every step: no page is in two places at once (guest memory, staging, current
file copy). At the end, every page reads back exactly as the reference says.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vmmswap.dataplane.guest_memory import data_ranges
from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.dataplane.swap_in import SwapInContext
from vmmswap.dataplane.trim import TrimContext
from vmmswap.uffd.pagesize import PAGE_SIZE

from .agent import page_content, page_digest
from .harness import FaultServer, Vmm

P = PAGE_SIZE
LAYOUT = [(0, 24 * P), (1 << 30, 16 * P)]
REGION_PAGES = [24, 16]
TOTAL = sum(REGION_PAGES)

_vmm: Vmm | None = None
_swap_dir = tempfile.TemporaryDirectory(prefix="vmmswap-model-")


def vmm() -> Vmm:
    global _vmm
    if _vmm is None or _vmm.proc.poll() is not None:
        _vmm = Vmm()
    return _vmm


@pytest.fixture(scope="module", autouse=True)
def _close_vmm() -> Iterator[None]:
    yield
    if _vmm is not None:
        _vmm.close()


pages = st.integers(0, TOTAL - 1)
seeds = st.integers(0, 4)  # 0 writes a zero page (trim fodder); few seeds: clean pages happen


class DataPlaneModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ref = [bytes(P)] * TOTAL
        self.handler: PageHandler | None = None
        self.trim: TrimContext | None = None
        self.swap_in: SwapInContext | None = None

    # --- set-up -----------------------------------------------------------------------------------
    @initialize(readahead=st.booleans(), window=st.sampled_from([2, 4, 8]))
    def start(self, readahead: bool, window: int) -> None:
        self.vmm = vmm()
        self.guest = self.vmm.new_guest(LAYOUT)
        self.handler = PageHandler.create(self.guest.regions(), _swap_dir.name,
                                          readahead=readahead,
                                          max_readahead_bytes=window * P)
        self.server = FaultServer(self.handler, self.guest.uffd)

    def teardown(self) -> None:
        try:
            if self.handler is not None:
                for region, count in enumerate(REGION_PAGES):
                    base = sum(REGION_PAGES[:region])
                    got = self.digests(base, count)
                    want = [page_digest(self.ref[base + i]) for i in range(count)]
                    assert got == want, f"region {region} differs from the reference"
        finally:
            if self.handler is not None:
                self.handler.close()

    # --- helpers --------------------------------------------------------------------------------
    def addr(self, page: int) -> int:
        region = 0 if page < REGION_PAGES[0] else 1
        return self.guest.addr(region, page - sum(REGION_PAGES[:region]))

    def region_end(self, page: int) -> int:
        return REGION_PAGES[0] if page < REGION_PAGES[0] else TOTAL

    def digests(self, page: int, count: int) -> list[str]:
        reply = self.vmm.request({"op": "digests", "addr": self.addr(page), "pages": count},
                                 self.server)
        return list(reply["digests"])

    # --- the guest ------------------------------------------------------------------------------
    @rule(page=pages, seed=seeds)
    def write_page(self, page: int, seed: int) -> None:
        self.vmm.request({"op": "write", "addr": self.addr(page), "seed": seed, "pages": 1},
                         self.server)
        self.ref[page] = page_content(seed, 0)

    @rule(page=pages, offset=st.integers(0, P - 8), value=st.binary(min_size=8, max_size=8))
    def poke(self, page: int, offset: int, value: bytes) -> None:
        self.vmm.request({"op": "poke", "addr": self.addr(page) + offset, "data": value.hex()},
                         self.server)
        old = self.ref[page]
        self.ref[page] = old[:offset] + value + old[offset + 8:]

    @rule(page=pages, count=st.integers(1, 12))
    def read(self, page: int, count: int) -> None:
        count = min(count, self.region_end(page) - page)
        got = self.digests(page, count)
        assert got == [page_digest(self.ref[page + i]) for i in range(count)]

    @rule(page=pages, count=st.integers(1, 6))
    def balloon_remove(self, page: int, count: int) -> None:
        count = min(count, self.region_end(page) - page)
        self.vmm.request({"op": "remove", "addr": self.addr(page), "length": count * P},
                         self.server)
        for i in range(count):
            self.ref[page + i] = bytes(P)

    # --- the monitor ----------------------------------------------------------------------------
    @rule()
    def enable(self) -> None:
        assert self.handler is not None
        self.handler.move_to_staging()
        self.trim = None

    @rule(steps=st.integers(1, 4), max_pages=st.integers(1, 8))
    def trim_steps(self, steps: int, max_pages: int) -> None:
        assert self.handler is not None
        if self.trim is None:
            self.trim = self.handler.start_trim()
        for _ in range(steps):
            if self.trim.trim_pages(max_pages) is None:
                self.trim = None
                break

    @rule(chunks=st.integers(1, 5), chunk_pages=st.integers(1, 8))
    def swap_out(self, chunks: int, chunk_pages: int) -> None:
        assert self.handler is not None
        for _ in range(chunks):
            if self.handler.swap_out(chunk_pages * P) == 0:
                break

    @rule(chunks=st.integers(1, 6), chunk_pages=st.integers(1, 8))
    def swap_in_steps(self, chunks: int, chunk_pages: int) -> None:
        assert self.handler is not None
        if self.swap_in is None:
            self.swap_in = self.handler.start_swap_in()
        for _ in range(chunks):
            if self.swap_in.swap_in(self.guest.uffd, chunk_pages * P) == 0:
                self.swap_in.close()
                self.swap_in = None
                break

    @precondition(lambda self: self.handler is not None)
    @rule()
    def swap_in_everything(self) -> None:
        assert self.handler is not None
        ctx = self.handler.start_swap_in()
        while ctx.swap_in(self.guest.uffd) > 0:
            pass
        ctx.close()
        assert self.handler.staging_pages == 0 and self.handler.swap_pages == 0
        # Every page that holds data is resident now: reading those must not fault once.
        for index, spec in enumerate(self.guest.specs):
            base = sum(REGION_PAGES[:index])
            for start, end in data_ranges(self.guest.memfds[index], spec.size):
                first, count = base + start // P, (end - start) // P
                reply = self.vmm.request({"op": "digests", "addr": self.addr(first),
                                          "pages": count}, None)
                assert reply["digests"] == [page_digest(self.ref[first + i])
                                            for i in range(count)]

    # --- invariants -----------------------------------------------------------------------------
    @invariant()
    def each_page_in_one_place(self) -> None:
        handler = self.handler
        if handler is None:
            return
        staged = handler.staging.present.bools(0, TOTAL)
        current = handler.swap_file.current.bools(0, TOTAL)
        assert not (staged & current).any(), "a page is staged and current in the file"
        for region in handler.regions:
            for start, end in data_ranges(region.memfd, region.size):
                first = region.base_page + start // P
                last = region.base_page + end // P
                assert not staged[first:last].any(), "a resident page is also staged"
                assert not current[first:last].any(), "a resident page is also current"
        m = handler.metrics()
        assert m.staging_pages + m.swap_pages + m.resident_pages <= TOTAL


DataPlaneModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_data_plane_model = pytest.mark.timeout(280)(DataPlaneModel.TestCase)
