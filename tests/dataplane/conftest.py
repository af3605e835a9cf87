"""Fixtures of the data-plane tests: the agent ("VMM") child and a handler rig around it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.dataplane.trim import TrimContext
from vmmswap.uffd.pagesize import PAGE_SIZE

from .agent import page_content, page_digest
from .harness import FaultServer, Guest, Vmm

MiB = 1024 * 1024


class Rig:
    """A guest in the agent, a handler over it, and a fault server; helpers in pages."""

    def __init__(self, vmm: Vmm, layout: list[tuple[int, int]], swap_dir: Path,
                 backing: str = "4k", register: bool = True, prepared: bool = False,
                 **handler_kwargs: Any) -> None:
        self.vmm = vmm
        #: enable() prepares staging first, as the monitor does: staging is mapped, and
        #: page-in, trim and swap-out take their paths through the mapping.
        self.prepared = prepared
        self.guest: Guest = vmm.new_guest(layout, backing=backing, register=register)
        self.handler = PageHandler.create(self.guest.regions(), swap_dir, **handler_kwargs)
        self.server = FaultServer(self.handler, self.guest.uffd)

    def addr(self, region: int, page: int = 0) -> int:
        return self.guest.addr(region, page)

    # --- the guest's side (each call serves the faults it causes) -------------------------------
    def write(self, addr: int, seed: int, pages: int = 1) -> None:
        self.vmm.request({"op": "write", "addr": addr, "seed": seed, "pages": pages}, self.server)

    def poke(self, addr: int, data: bytes) -> None:
        self.vmm.request({"op": "poke", "addr": addr, "data": data.hex()}, self.server)

    def read(self, addr: int, length: int) -> bytes:
        reply = self.vmm.request({"op": "read", "addr": addr, "length": length}, self.server)
        return bytes.fromhex(reply["data"])

    def digests(self, addr: int, pages: int) -> list[str]:
        reply = self.vmm.request({"op": "digests", "addr": addr, "pages": pages}, self.server)
        return list(reply["digests"])

    def read_quietly(self, addr: int, length: int) -> bytes:
        """Read while asserting that nothing faults."""
        reply = self.vmm.request({"op": "read", "addr": addr, "length": length}, None)
        return bytes.fromhex(reply["data"])

    def digests_quietly(self, addr: int, pages: int) -> list[str]:
        """Page digests while asserting that nothing faults."""
        reply = self.vmm.request({"op": "digests", "addr": addr, "pages": pages}, None)
        return list(reply["digests"])

    def remove(self, addr: int, length: int) -> None:
        self.vmm.request({"op": "remove", "addr": addr, "length": length}, self.server)

    def seq_read(self, addr: int, length: int, chunk: int = MiB) -> float:
        reply = self.vmm.request({"op": "seq_read", "addr": addr, "length": length,
                                  "chunk": chunk}, self.server)
        return float(reply["elapsed"])

    # --- expectations ---------------------------------------------------------------------------
    @staticmethod
    def expected(seed: int, pages: int = 1) -> list[str]:
        return [page_digest(page_content(seed, i)) for i in range(pages)]

    def check(self, addr: int, seed: int, pages: int = 1) -> None:
        assert self.digests(addr, pages) == self.expected(seed, pages)

    # --- the monitor's side ---------------------------------------------------------------------
    def enable(self) -> int:
        if self.prepared:
            self.handler.prepare_move()
            assert self.handler.staging.mapped, "a prepared enable leaves staging mapped"
        return self.handler.move_to_staging()

    def out_all(self, max_bytes: int = 2 * MiB) -> int:
        total = 0
        while (n := self.handler.swap_out(max_bytes)) > 0:
            total += n
        return total

    def trim_all(self, max_pages: int = 1024) -> TrimContext:
        ctx = self.handler.start_trim()
        while ctx.trim_pages(max_pages) is not None:
            pass
        return ctx

    def swap_in_all(self, max_bytes: int = 2 * MiB) -> int:
        ctx = self.handler.start_swap_in()
        total = 0
        try:
            while (n := ctx.swap_in(self.guest.uffd, max_bytes)) > 0:
                total += n
        finally:
            ctx.close()
        return total

    def close(self) -> None:
        self.handler.close()


RigFactory = Callable[..., Rig]


@pytest.fixture
def vmm() -> Iterator[Vmm]:
    with Vmm() as child:
        yield child


@pytest.fixture
def make_rig(vmm: Vmm, tmp_path: Path) -> Iterator[RigFactory]:
    rigs: list[Rig] = []

    def make(layout: list[tuple[int, int]] | None = None, **kwargs: Any) -> Rig:
        """A rig; readahead is off unless asked for (crosvm's one page per fault)."""
        kwargs.setdefault("readahead", False)
        rig = Rig(vmm, layout or [(0, 64 * PAGE_SIZE)], tmp_path, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
