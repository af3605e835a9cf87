"""The actors that touch guest memory: worker threads in the VMM and forked device processes.

Every access goes through ``GuestMemory.read/write/discard`` (ctypes memmove / madvise: the GIL
is released), so a thread blocked on a fault blocks only itself. An actor writes only pages it
owns, and checks what it reads on its own pages and on the shared read-only pages.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import traceback
from typing import Final

import numpy as np

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.uffd.pagesize import PAGE_SIZE

from .model import SHARED, UNKNOWN, Ownership, check, content, region_spans

#: The longest run an actor reads or writes in one op, in pages.
MAX_RUN: Final = 320
LOG_OPS: Final = 12


class Failure(Exception):  # noqa: N818 (a scenario failure, not an error of the harness)
    """A wrong page (or a broken actor): the scenario fails with this message."""


class Actor:
    """The op mix shared by workers and devices, on the pages owned by ``who``."""

    def __init__(self, name: str, who: int, memory: GuestMemory, own: Ownership,
                 versions: np.ndarray, rng: random.Random,
                 corrupt_at: int | None = None) -> None:
        self.name = name
        self.who = who
        self.memory = memory
        self.own = own
        self.versions = versions  # shared array: this actor writes only its own slots
        self.rng = rng
        self.mine = np.flatnonzero(own.owner == who)
        self.readable = (own.owner == who) | (own.owner == SHARED)
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_OPS)
        self.ops = 0
        self.pages_checked = 0
        self.corrupt_at = corrupt_at  # negative control: drop a page behind the model's back

    def addr(self, index: int) -> int:
        return int(self.own.gpages[index]) * PAGE_SIZE

    def fail(self, what: str) -> Failure:
        return Failure(f"{self.name}: {what}; last ops: " + " | ".join(self.log))

    def step(self) -> None:
        self.ops += 1
        if self.corrupt_at is not None and self.ops == self.corrupt_at and self.corrupt():
            return
        roll = self.rng.random()
        if roll < 0.45:
            self.read_verify(*self.pick_range())
        elif roll < 0.85:
            self.write(*self.pick_range())
        else:
            self.discard()

    def pick_range(self) -> tuple[int, int]:
        n = self.own.gpages.size
        if self.mine.size and self.rng.random() < 0.7:
            first = int(self.rng.choice(self.mine))  # start on an own page
        else:
            first = self.rng.randrange(n)
        count = self.rng.choice((1, 1, 2, 7, 33, 100, self.rng.randint(1, MAX_RUN)))
        return first, min(count, n - first)

    def read_verify(self, first: int, count: int) -> None:
        self.log.append(f"read {first}+{count}")
        for lo, cnt in region_spans(first, count):
            data = self.memory.read(self.addr(lo), cnt * PAGE_SIZE)
            sl = slice(lo, lo + cnt)
            versions = self.versions[sl]
            mask = self.readable[sl] & (versions != UNKNOWN)
            bad = check(data, self.own.gpages[sl], versions, mask)
            if bad is not None:
                raise self.fail(bad.describe())
            self.pages_checked += int(mask.sum())

    def write(self, first: int, count: int) -> None:
        self.log.append(f"write {first}+{count}")
        for lo, cnt in region_spans(first, count):
            for start, length in _runs(self.own.owner[lo:lo + cnt] == self.who):
                sl = slice(lo + start, lo + start + length)
                old = self.versions[sl]
                new = np.where(old == UNKNOWN, np.uint32(1), old + np.uint32(1))
                data = content(self.own.gpages[sl], new).tobytes()
                # The model moves first: a reader of these pages is this thread only.
                self.versions[sl] = new
                self.memory.write(self.addr(lo + start), data)

    def discard(self) -> None:
        """A balloon inflating over a run of own pages: they must read as zeros afterwards."""
        if self.mine.size == 0:
            return
        first = int(self.rng.choice(self.mine))
        (_, cnt), *_ = region_spans(first, self.rng.choice((1, 4, 32)))  # first's region
        length = 0
        while length < cnt and self.own.owner[first + length] == self.who:
            length += 1
        self.log.append(f"discard {first}+{length}")
        self.memory.discard(self.addr(first), length * PAGE_SIZE)
        self.versions[first:first + length] = 0

    def corrupt(self) -> bool:
        """Negative control: discard one written own page and keep its version in the model,
        as if the monitor had served a zero page; the next read of it must fail."""
        written = self.mine[(self.versions[self.mine] != 0)
                            & (self.versions[self.mine] != UNKNOWN)]
        if written.size == 0:
            self.corrupt_at = self.ops + 1
            return False
        page = int(written[0])
        self.log.append(f"CORRUPT {page}")
        self.memory.discard(self.addr(page), PAGE_SIZE)
        self.read_verify(page, 1)
        return True


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of the True runs of ``mask``."""
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


class Worker(Actor):
    """A thread of the VMM, running ops until told to stop."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
        except Failure as err:
            self.error = str(err)
        except BaseException as err:
            self.error = self.fail(f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
                                   ).args[0]


def device_main(actor: Actor, ops: int, result_fd: int) -> int:
    """In a forked device process, after registration: ``ops`` ops, then report the versions
    of its pages (or the failure) on ``result_fd``. Exit code 0 good, 2 mismatch, 3 error."""
    try:
        for _ in range(ops):
            actor.step()
        message = b"OK" + actor.versions[actor.mine].tobytes()
        code = 0
    except Failure as err:
        message, code = b"BAD" + str(err).encode(), 2
    except BaseException as err:
        message = b"BAD" + str(actor.fail(f"{type(err).__name__}: {err}\n"
                                          f"{traceback.format_exc()}")).encode()
        code = 3
    view = memoryview(message)
    while view:
        view = view[os.write(result_fd, view):]
    return code
