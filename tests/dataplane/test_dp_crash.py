"""Crash at every step: a monitor SIGKILLed between any two state changes loses no page (issue 12).

Each trial builds guest memory in the agent (the "VMM"), spreads its pages over guest memory,
staging and the swap file with a handler in this process (which never touches guest memory),
then hands the descriptors to a child of the fork server (:mod:`.crash_monitor`) that resumes a
handler, runs one operation -- move to staging, swap-out, trim, swap-in, serving faults, serving
REMOVEs -- and SIGKILLs itself at the N-th crash point it passes (or is killed at a random
instant). A fresh :meth:`PageHandler.resume` here then wakes the ranges, serves what the agent
was waiting for, and every page is checked against the numpy model -- right away, and again
after a whole move/out/trim/swap-in cycle. The slot accounting (a slot is used exactly when one
page names it) and staging's leftovers (freed) are checked too.

Negative controls: marking staged pages after the punch (``move.MARK_AFTER_PUNCH``), discards
the VMM does not announce, and a successor that skips the journal are each caught.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from huge_settings import HugeSettings
from vmmswap.dataplane.guest_memory import HUGETLB_2M_SIZE, data_ranges
from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.dataplane.page_state import PageState
from vmmswap.dataplane.staging import StagingMemory, create_staging_memfd
from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.uffd.pagesize import PAGE_SIZE

from .agent import page_content, page_digest
from .harness import FaultServer, Guest, Vmm

pytestmark = pytest.mark.timeout(120)

P = PAGE_SIZE


@dataclass(frozen=True)
class Geometry:
    """The guest of a trial: its page (4 KiB, or 2 MiB hugetlbfs) and regions in pages."""

    page_size: int
    layout: tuple[tuple[int, int], ...]  # (guest address, pages)
    backing: str

    @property
    def pages(self) -> int:
        return sum(n for _, n in self.layout)


SMALL = Geometry(P, ((0, 48), (1 << 20, 16)), "4k")
HUGE = Geometry(HUGETLB_2M_SIZE, ((0, 6), (64 << 20, 2)), "2M")
MONITOR = Path(__file__).with_name("crash_monitor.py")
SRC = str(Path(__file__).resolve().parents[2] / "src")
DIGEST = {0: page_digest(page_content(0))}


def _digest(seed: int) -> str:
    if seed not in DIGEST:
        DIGEST[seed] = page_digest(page_content(seed))
    return DIGEST[seed]


class ForkServer:
    """The crash monitor's fork server (one per test module)."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen([sys.executable, str(MONITOR), str(child.fileno())],
                                     pass_fds=(child.fileno(),), env=env)
        child.close()

    def close(self) -> None:
        try:
            self.sock.send(b'{"op": "exit"}')
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def agent() -> Iterator[Vmm]:
    with Vmm() as vmm:
        yield vmm


@dataclass
class Outcome:
    killed_at: str | None = None
    hits: int = -1
    names: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)


class Trial:
    """One guest, one operation in a child that dies, one successor that checks everything."""

    def __init__(self, vmm: Vmm, forks: ForkServer, swap_dir: Path, seed: int,
                 geometry: Geometry = SMALL) -> None:
        self.geometry = geometry
        ps = self.ps = geometry.page_size
        self.n = n = geometry.pages
        self.vmm = vmm
        self.forks = forks
        self.rng = random.Random(seed)
        self.seed = seed
        self.guest: Guest = vmm.new_guest([(g, k * ps) for g, k in geometry.layout],
                                          backing=geometry.backing)
        order = sorted(range(len(geometry.layout)),
                       key=lambda i: self.guest.specs[i].host_addr)
        self.specs = [self.guest.specs[i] for i in order]
        self.regions = [(self.guest.specs[i], self.guest.memfds[i]) for i in order]
        self.host = [s.host_addr + k * ps for s in self.specs for k in range(s.size // ps)]
        self.gpa = [s.guest_addr + k * ps for s in self.specs for k in range(s.size // ps)]
        self.model = np.zeros(n, dtype=np.int64)
        self.state = PageState.create(self.specs, ps)
        # The agent's memory is registered from the start: as a monitor would, say so, or the
        # agent clears its own discard marks (no REMOVE, it would think, was ever made).
        self.state.registered = True
        self.staging = create_staging_memfd(ps)
        self.swap_fd = os.open(swap_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)

    # --- the agent ------------------------------------------------------------------------------
    def request(self, cmd: dict[str, Any], server: FaultServer | None,
                fds: list[int] | None = None) -> dict[str, Any]:
        if fds:
            socket.send_fds(self.vmm.sock, [json.dumps(cmd).encode()], fds)
            self.vmm._wait_readable(30.0, server)
            reply: dict[str, Any] = json.loads(self.vmm.sock.recv(1 << 20))
            return reply
        return self.vmm.request(cmd, server)

    def write(self, server: FaultServer, pages: list[int], zero_share: float = 0.2) -> None:
        writes = []
        for p in pages:
            seed = 0 if self.rng.random() < zero_share else self.rng.randrange(1, 1 << 40)
            self.model[p] = seed
            writes.append([self.host[p], seed])
        self.vmm.request({"op": "write_many", "writes": writes}, server)

    def digests(self, server: FaultServer) -> list[str]:
        """The first 4 KiB of every page (what the model writes), in page order."""
        ranges = [[addr, 1] for addr in self.host]
        got: list[str] = self.vmm.request({"op": "digests_many", "ranges": ranges},
                                          server)["digests"]
        return got

    def wrong_pages(self, digests: list[str], when: str) -> list[str]:
        return [f"{when}: page {p} (model seed {int(self.model[p])})"
                for p in range(self.n) if digests[p] != _digest(int(self.model[p]))]

    # --- building the state ---------------------------------------------------------------------
    def handler(self, *, resume: bool) -> PageHandler:
        if resume:
            return PageHandler.resume(self.regions, swap_file=self.swap_fd, state=self.state,
                                      staging_fd=self.staging, readahead=True)
        return PageHandler.create(self.regions, swap_file=SwapFile(self.swap_fd, None),
                                  state=self.state, staging_fd=self.staging,
                                  readahead=self.rng.random() < 0.5)

    def build(self, log_discards: bool) -> None:
        """Pages in guest memory, staging (clean ones and zero ones among them), the file."""
        rng = self.rng
        self.request({"op": "log_discards", "on": log_discards}, None, [self.state.fileno()])
        h = self.handler(resume=False)
        server = FaultServer(h, self.guest.uffd)
        n, ps = self.n, self.ps
        self.write(server, rng.sample(range(n), n * 11 // 16))
        h.move_to_staging()
        for _ in range(rng.randint(1, 4)):
            h.swap_out(rng.randint(1, max(1, n // 5)) * ps)
        for p in rng.sample(range(n), n // 5):  # back from the file or staging: clean copies
            self.vmm.request({"op": "digests", "addr": self.host[p], "pages": 1}, server)
        self.write(server, rng.sample(range(n), n // 8))
        h.move_to_staging()
        for _ in range(rng.randint(0, 3)):
            h.swap_out(rng.randint(1, max(1, n // 5)) * ps)
        self.write(server, rng.sample(range(n), max(2, n // 10)))  # resident
        self.held = [p for p in range(n) if self.model[p] and (
            h.staging.present.get(p) or h.swap_file.is_current(p))]
        h.close()

    # --- the operation in a child that dies -----------------------------------------------------
    def run(self, op: str, kill_at: int, *, wrong_order: bool = False,
            kill_after: float | None = None, workers: int = 2,
            then_kill_at: int | None = None) -> Outcome:
        """Run ``op`` in a child killed at ``kill_at``; with ``then_kill_at``, run it again in a
        second child (a successor that dies too) before this process resumes and checks."""
        outcome, pending, reply = self.run_child(op, kill_at, wrong_order=wrong_order,
                                                 kill_after=kill_after, workers=workers)
        if then_kill_at is not None:
            assert not pending
            second, _, _ = self.run_child(op, then_kill_at, workers=workers)
            outcome.killed_at = f"{outcome.killed_at}, then {second.killed_at}"
        self.check(outcome, pending, reply)
        return outcome

    def run_child(self, op: str, kill_at: int, *, wrong_order: bool = False,
                  kill_after: float | None = None, workers: int = 2
                  ) -> tuple[Outcome, bool, dict[str, Any] | None]:
        outcome = Outcome()
        stop_r, stop_w = os.pipe()
        # out_direct: swap-out from the staging mapping (pwritev, no bounce buffer).
        child_op = "serve" if op.startswith("serve_") else "out" if op == "out_direct" else op
        cfg = {"op": child_op, "map_staging": op == "out_direct", "kill_at": kill_at,
               "workers": workers, "wrong_order": wrong_order,
               "regions": [[s.guest_addr, s.host_addr, s.size] for s in self.specs],
               "readahead": self.rng.random() < 0.7, "step_pages": self.rng.choice([1, 3, 8])}
        fds = [self.guest.uffd.fileno(), self.state.fileno(), self.staging, self.swap_fd,
               stop_r, *(fd for _, fd in self.regions)]
        socket.send_fds(self.forks.sock, [json.dumps(cfg).encode()], fds)
        os.close(stop_r)
        pending = False
        if op in ("serve_faults", "mixed"):
            # The later region first: the pages staged last are served by the dead monitor.
            ranges = [[addr, 1] for addr in reversed(self.host)]
            self.vmm.sock.send(json.dumps({"op": "digests_many", "ranges": ranges}).encode())
            pending = True
        elif op == "serve_remove":
            pages = self.rng.sample(self.held, min(6, len(self.held)))
            pages += self.rng.sample(range(self.n), 3)
            for p in pages:
                self.model[p] = 0
            self.vmm.sock.send(json.dumps({"op": "discard_many",
                                           "ranges": [[self.gpa[p], self.ps] for p in pages]}
                                          ).encode())
            pending = True
        reply: dict[str, Any] | None = None
        pid = -1
        start = time.monotonic()
        deadline = start + 30
        poller = select.poll()
        poller.register(self.forks.sock, select.POLLIN)
        if pending:
            poller.register(self.vmm.sock, select.POLLIN)
        exited = False
        while not exited:
            timeout = deadline - time.monotonic()
            assert timeout > 0, "the crash monitor did not end"
            if kill_after is not None and pid > 0:
                timeout = min(timeout, max(0.0, start + kill_after - time.monotonic()))
            ready = dict(poller.poll(timeout * 1000))
            if kill_after is not None and pid > 0 and time.monotonic() >= start + kill_after:
                with contextlib.suppress(ProcessLookupError):  # it ended first
                    os.kill(pid, signal.SIGKILL)
                kill_after = None
            if self.vmm.sock.fileno() in ready and reply is None:
                reply = json.loads(self.vmm.sock.recv(1 << 20))
                poller.unregister(self.vmm.sock)
                os.close(stop_w)
                stop_w = -1
            if self.forks.sock.fileno() in ready:
                msg = json.loads(self.forks.sock.recv(1 << 16))
                if "pid" in msg:
                    pid = msg["pid"]
                elif "killed_at" in msg:
                    outcome.killed_at = msg["killed_at"]
                elif "done" in msg:
                    outcome.hits, outcome.names = msg["hits"], msg["names"]
                elif "error" in msg:
                    raise AssertionError(f"crash monitor: {msg['error']}")
                elif "exit" in msg:
                    exited = True
        if stop_w >= 0:
            os.close(stop_w)
        return outcome, pending, reply

    # --- the successor ----------------------------------------------------------------------------
    def check(self, outcome: Outcome, pending: bool, reply: dict[str, Any] | None) -> None:
        h = self.handler(resume=True)
        try:
            for spec in self.specs:
                self.guest.uffd.wake(spec.host_addr, spec.size)
            server = FaultServer(h, self.guest.uffd)
            if pending and reply is None:
                self.vmm._wait_readable(30.0, server)
                reply = json.loads(self.vmm.sock.recv(1 << 20))
            if reply is not None and "digests" in reply:
                outcome.wrong += self.wrong_pages(reply["digests"][::-1], "during")
            outcome.wrong += self.slot_accounting("resumed")
            outcome.wrong += self.wrong_pages(self.digests(server), "after")
            h.staging.flush()
            outcome.wrong += self.staging_leftovers(h)
            try:
                self.cycle(h)
            except (RuntimeError, OSError) as err:  # loud, not silent, but still wrong
                outcome.wrong.append(f"cycle failed: {err}")
                return
            outcome.wrong += self.wrong_pages(self.digests(server), "cycle")
            outcome.wrong += self.slot_accounting("cycle")
        finally:
            h.close()

    def cycle(self, h: PageHandler) -> None:
        """A whole cycle on the successor: stale state would show after it."""
        h.move_to_staging()
        while h.swap_out(5 * self.ps) > 0:
            pass
        h.move_to_staging()
        ctx = h.start_trim()
        while ctx.trim_pages(7) is not None:
            pass
        swap_in = h.start_swap_in()
        while swap_in.swap_in(self.guest.uffd, 9 * self.ps) > 0:
            pass

    def slot_accounting(self, when: str) -> list[str]:
        slots = self.state.slots.astype(np.int64) - 1
        named = slots[slots >= 0]
        used = np.flatnonzero(np.unpackbits(self.state.slot_used.view(np.uint8),
                                            bitorder="little")[:self.n])
        problems = []
        if np.unique(named).size != named.size:
            problems.append(f"{when}: a slot is named by two pages")
        named_set, used_set = set(named.tolist()), set(used.tolist())
        if named_set != used_set:
            problems.append(f"{when}: used slots {sorted(used_set - named_set)} named by no "
                            f"page, slots {sorted(named_set - used_set)} named but free")
        return problems

    def staging_leftovers(self, h: PageHandler) -> list[str]:
        out = []
        ps = self.ps
        for start, end in data_ranges(self.staging, self.n * ps):
            for p in range(start // ps, (end + ps - 1) // ps):
                if not h.staging.present.get(p):
                    out.append(f"staging page {p} is held but not present (leaked)")
        return out

    def close(self) -> None:
        self.state.close()
        os.close(self.staging)
        os.close(self.swap_fd)


def _trial(agent: Vmm, forks: ForkServer, tmp_path: Path, op: str, seed: int, kill_at: int,
           geometry: Geometry = SMALL, **kwargs: Any) -> Outcome:
    trial = Trial(agent, forks, tmp_path, seed, geometry)
    try:
        trial.build(kwargs.pop("log_discards", True))
        return trial.run(op, kill_at, **kwargs)
    finally:
        trial.close()


OPS = ["move", "out", "trim", "swapin", "serve_faults", "serve_remove", "mixed", "out_direct"]


#: Injected kill points per operation (spread evenly over the points it passes).
BUDGET = 32


def _kill_points(hits: int, budget: int) -> list[int]:
    if hits <= budget:
        return list(range(hits))
    return sorted({round(i * (hits - 1) / (budget - 1)) for i in range(budget)})


@pytest.mark.parametrize("op", OPS)
def test_crash_at_every_step(agent: Vmm, fork_server: ForkServer, tmp_path: Path,
                             op: str) -> None:
    seed = 1000 + OPS.index(op)
    dry = _trial(agent, fork_server, tmp_path, op, seed, -1)
    assert dry.killed_at is None and not dry.wrong, dry.wrong
    assert dry.hits > 0
    failures = []
    kills = 0
    points = _kill_points(dry.hits, BUDGET)
    for k in points:
        out = _trial(agent, fork_server, tmp_path, op, seed, k)
        kills += out.killed_at is not None
        failures += [f"kill {k} at {out.killed_at}: {w}" for w in out.wrong]
        # How many faults arrive (and so how many points a run passes) varies with timing in
        # the serving operations; a run that passed point k without dying is a broken
        # injection, one that ended before reaching it is not.
        if out.killed_at is None and out.hits > k:
            failures.append(f"kill {k}: the run passed {out.hits} points and was not killed")
    # Random instants too, on fresh seeds (not only between named steps).
    for i in range(4):
        out = _trial(agent, fork_server, tmp_path, op, seed + 100 * (i + 1), -1,
                     kill_after=random.Random(seed + i).uniform(0.0, 0.03))
        failures += [f"random kill {i}: {w}" for w in out.wrong]
    assert kills >= len(points) * 0.6, f"only {kills} of {len(points)} kill points reached"
    assert not failures, "\n".join(failures[:20])


def _kills_at(agent: Vmm, forks: ForkServer, tmp_path: Path, op: str, seed: int, name: str,
              **kwargs: Any) -> list[Outcome]:
    """Every trial of ``op`` killed at a crash point called ``name`` (one move worker: the
    points come in the same order every time)."""
    kwargs.setdefault("workers", 1)
    dry = _trial(agent, forks, tmp_path, op, seed, -1, **kwargs)
    points = [i for i, n in enumerate(dry.names) if n == name]
    assert points, f"{op} never passes {name}: {sorted(set(dry.names))}"
    chosen = [points[i] for i in _kill_points(len(points), 8)]
    outs = [_trial(agent, forks, tmp_path, op, seed, k, **kwargs) for k in chosen]
    assert all(o.killed_at == name for o in outs)
    return outs


def test_control_punch_before_mark_loses_pages(agent: Vmm, fork_server: ForkServer,
                                               tmp_path: Path) -> None:
    """The wrong order (punch, then mark staged) is caught as wrong pages; the right one,
    killed at the same point, is not."""
    bad = _kills_at(agent, fork_server, tmp_path, "move", 7, "move.punched", wrong_order=True)
    assert any("after: page" in w for o in bad for w in o.wrong), [o.wrong for o in bad]
    good = _kills_at(agent, fork_server, tmp_path, "move", 7, "move.punched")
    assert not [w for o in good for w in o.wrong]


def test_control_unannounced_discard_serves_stale_data(agent: Vmm, fork_server: ForkServer,
                                                       tmp_path: Path) -> None:
    """A REMOVE read by the dead monitor and never applied: without the VMM's discard log the
    successor serves the old copy where the guest expects zeros."""
    bad = _kills_at(agent, fork_server, tmp_path, "serve_remove", 8, "serve.remove_read",
                    log_discards=False)
    assert any("model seed 0" in w for o in bad for w in o.wrong), [o.wrong for o in bad]
    good = _kills_at(agent, fork_server, tmp_path, "serve_remove", 8, "serve.remove_read")
    assert not [w for o in good for w in o.wrong]


def test_control_successor_without_journal(agent: Vmm, fork_server: ForkServer,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """A successor that ignores the journal leaves a swap-out's slot used by no page (and
    would hand it out twice after a REMOVE's half-done frees): the accounting check sees it."""
    monkeypatch.setattr(PageHandler, "recover", lambda self: None)
    bad = _kills_at(agent, fork_server, tmp_path, "out", 9, "out.used")
    assert any("named by no page" in w for o in bad for w in o.wrong), [o.wrong for o in bad]
    monkeypatch.undo()
    good = _kills_at(agent, fork_server, tmp_path, "out", 9, "out.used")
    assert not [w for o in good for w in o.wrong]


def test_control_successor_without_sweep_leaks_staging(
        agent: Vmm, fork_server: ForkServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Staging pages the dead monitor had let go but not yet punched are freed by the
    successor; one that does not sweep keeps them (the leftover check sees it)."""
    monkeypatch.setattr(StagingMemory, "_leaked_ranges", lambda self: [])
    bad = _kills_at(agent, fork_server, tmp_path, "serve_faults", 10, "serve.fault_read")
    assert any("leaked" in w for o in bad for w in o.wrong), [o.wrong for o in bad]
    monkeypatch.undo()
    good = _kills_at(agent, fork_server, tmp_path, "serve_faults", 10, "serve.fault_read")
    assert not [w for o in good for w in o.wrong]


@pytest.mark.parametrize("op", OPS)
def test_crash_at_every_step_on_hugetlbfs(agent: Vmm, fork_server: ForkServer, tmp_path: Path,
                                          huge_settings: HugeSettings, op: str) -> None:
    """The same on 2 MiB hugetlbfs guest memory (every page, bit and slot a huge page)."""
    huge_settings.reserve_hugetlb(HUGE.pages + 1)
    seed = 3000 + OPS.index(op)
    try:
        dry = _trial(agent, fork_server, tmp_path, op, seed, -1, HUGE)
        assert dry.killed_at is None and not dry.wrong, dry.wrong
        failures = []
        for k in _kill_points(dry.hits, 12):
            out = _trial(agent, fork_server, tmp_path, op, seed, k, HUGE)
            failures += [f"kill {k} at {out.killed_at}: {w}" for w in out.wrong]
        assert not failures, "\n".join(failures[:20])
    finally:
        # Give the huge pages back before the pool shrinks again.
        agent.request({"op": "drop"})
        if agent.guest is not None:
            agent.guest.close()
            agent.guest = None


@pytest.mark.parametrize("op", ["move", "out", "trim", "swapin"])
def test_two_deaths_in_a_row(agent: Vmm, fork_server: ForkServer, tmp_path: Path,
                             op: str) -> None:
    """The successor dies too, at another step of the same operation, before a third
    handler resumes: still every page intact."""
    seed = 2000 + OPS.index(op)
    dry = _trial(agent, fork_server, tmp_path, op, seed, -1)
    rng = random.Random(seed)
    failures = []
    for _ in range(6):
        first = rng.randrange(dry.hits)
        out = _trial(agent, fork_server, tmp_path, op, seed, first,
                     then_kill_at=rng.randrange(max(1, dry.hits - first)))
        failures += [f"kills at {out.killed_at}: {w}" for w in out.wrong]
    assert not failures, "\n".join(failures[:20])
