"""PageState: the per-page arrays in a memfd a successor monitor can map (issue 12)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vmmswap.dataplane.discard_log import DiscardLog, clear, forget_settled, pending_runs
from vmmswap.dataplane.guest_memory import GuestMemory, RegionSpec
from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.dataplane.page_state import (
    CONTROL_AREA_BYTES,
    HEADER_BYTES,
    JournalOp,
    PageState,
    PageStateError,
)
from vmmswap.dataplane.staging import create_staging_memfd
from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE

P = PAGE_SIZE
SPECS = [RegionSpec(0, 0x10000000, 64 * P), RegionSpec(0x100000, 0x20000000, 3 * P)]
SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_round_trip_and_header() -> None:
    with PageState.create(SPECS, P) as state:
        assert state.num_pages == 67 and state.page_size == P and state.generation == 0
        assert state.regions() == SPECS
        assert state.control.nbytes == CONTROL_AREA_BYTES
        state.staging_present[0] = 0b101
        state.slots[66] = 7
        state.control[:4] = b"ctrl"
        with PageState.attach(state.fileno()) as other:
            assert other.regions() == SPECS and other.num_pages == 67
            assert int(other.staging_present[0]) == 0b101 and int(other.slots[66]) == 7
            assert bytes(other.control[:4]) == b"ctrl"
            other.file_current[1] = 9
            other.next_generation()
        assert int(state.file_current[1]) == 9 and state.generation == 1
        # Negative control: a fresh state does not see these writes.
        with PageState.create(SPECS, P) as fresh:
            assert int(fresh.slots[66]) == 0 and not fresh.staging_present.any()


def test_arrays_live_in_the_memfd_across_processes() -> None:
    """A second process attaches in its own mapping and sees (and makes) the writes."""
    with PageState.create(SPECS, P) as state:
        state.slots[5] = 1234
        code = ("import os, sys\n"
                "from vmmswap.dataplane.page_state import PageState\n"
                "s = PageState.attach(int(sys.argv[1]))\n"
                "assert int(s.slots[5]) == 1234, int(s.slots[5])\n"
                "s.slots[6] = 4321\n"
                "s.staging_present[1] = 3\n")
        env = dict(os.environ, PYTHONPATH=SRC)
        subprocess.run([sys.executable, "-c", code, str(state.fileno())],
                       pass_fds=(state.fileno(),), env=env, check=True, timeout=60)
        assert int(state.slots[6]) == 4321 and int(state.staging_present[1]) == 3
        # Negative control: the check in the child can fail.
        state.slots[5] = 1
        failed = subprocess.run([sys.executable, "-c", code, str(state.fileno())],
                                pass_fds=(state.fileno(),), env=env, timeout=60,
                                capture_output=True, check=False)
        assert failed.returncode != 0


def _bytes_of(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


@pytest.mark.parametrize("damage", ["magic", "version", "truncated", "grown", "short", "table"])
def test_attach_refuses_a_damaged_state(damage: str) -> None:
    with PageState.create(SPECS, P) as state:
        fd = os.dup(state.fileno())
    try:
        if damage == "magic":
            os.pwrite(fd, b"NOTVMMSW", 0)
        elif damage == "version":
            os.pwrite(fd, (99).to_bytes(8, "little"), 8)
        elif damage == "truncated":
            os.ftruncate(fd, os.fstat(fd).st_size - 4096)
        elif damage == "grown":
            os.ftruncate(fd, os.fstat(fd).st_size + 4096)
        elif damage == "short":
            os.ftruncate(fd, HEADER_BYTES - 8)
        elif damage == "table":
            os.pwrite(fd, (5).to_bytes(8, "little"), 32 * 8 + 24)  # region 0: 5 pages
        before = _bytes_of(fd)
        with pytest.raises(PageStateError):
            PageState.attach(fd)
        assert _bytes_of(fd) == before  # nothing changed
    finally:
        os.close(fd)


def test_attach_refuses_foreign_descriptors(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(PageStateError, match="not a regular file"):
            PageState.attach(r)
    finally:
        os.close(r)
        os.close(w)
    fd = os.memfd_create("foreign")
    try:
        os.write(fd, os.urandom(3 * 4096))
        with pytest.raises(PageStateError, match="not a vmmswap page state"):
            PageState.attach(fd)
        os.ftruncate(fd, 0)
        with pytest.raises(PageStateError, match="too short"):
            PageState.attach(fd)
    finally:
        os.close(fd)
    with pytest.raises(PageStateError):
        PageState.attach(987654)  # not open


def test_create_is_sparse_and_reset_frees() -> None:
    # 16 GiB of 4 KiB pages: the state is about 17.5 MiB but nothing is allocated.
    specs = [RegionSpec(0, 1 << 32, 16 << 30)]
    with PageState.create(specs, P) as state:
        assert state.nbytes > 17 << 20
        assert state.allocated_bytes() <= 64 * 1024
        state.slots[:1 << 20] = 1  # 4 MiB written
        state.discard_pending[7] = 1  # a discard announced, its madvise still to come
        assert state.allocated_bytes() >= 4 << 20
        state.reset()
        assert state.allocated_bytes() <= 64 * 1024
        assert int(state.slots[12345]) == 0
        # The discard log is the VMM's: a fresh enable keeps an in-flight mark.
        assert int(state.discard_pending[7]) == 1


def test_handler_keeps_its_arrays_in_the_state(tmp_path: Path) -> None:
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, 64 * P)
    os.pwrite(memfd, b"x" * P, 3 * P)
    specs = [RegionSpec(0, 0x10000000, 64 * P)]
    state = PageState.create(specs, P)
    staging = create_staging_memfd(P)
    swap = SwapFile.create(tmp_path, None)
    try:
        handler = PageHandler.create([(specs[0], memfd)], swap_file=swap, state=state,
                                     staging_fd=staging)
        assert state.generation == 1
        assert handler.move_to_staging() == 1
        assert int(state.staging_present[0]) == 1 << 3
        assert handler.swap_out() == 1
        assert int(state.slots[3]) == 1 and int(state.file_current[0]) == 1 << 3
        assert int(state.staging_present[0]) == 0 and int(state.file_end[0]) == 1
        assert state.journal.op == JournalOp.NONE
        handler.close()
        os.fstat(staging)  # the caller's descriptors stay open
        with pytest.raises(PageStateError, match="describes"):
            PageHandler.create([(RegionSpec(0, 0x10000000, 32 * P), memfd)], tmp_path,
                               state=state, staging_fd=staging)
    finally:
        state.close()
        os.close(staging)
        os.close(memfd)


def test_discard_log_marks_and_finds() -> None:
    with PageState.create(SPECS, P) as state:
        log = DiscardLog(state)
        assert pending_runs(state) == []
        log.announce(0x20000000 + P, 2 * P)  # region 1, pages 65-66
        log.announce(0x10000000 + 10 * P, P)
        assert pending_runs(state) == [(10, 11), (65, 67)]
        clear(state, 65, 67)
        assert pending_runs(state) == [(10, 11)]
        with pytest.raises(ValueError, match="one guest region"):
            log.announce(0x10000000 + 63 * P, 2 * P)
        assert np.count_nonzero(state.discard_pending) == 1
        log.announce(0x10000000 + 62 * P, 2 * P)
        log.announce(0x20000000, P)
        log.forget(0x10000000 + 63 * P, 0x20000000 + P)  # spans the gap between regions
        assert pending_runs(state) == [(10, 11), (62, 63)]


def test_discard_marks_outlive_their_discard_only_where_a_successor_needs_them() -> None:
    """A discard made while nothing is registered sends no REMOVE, so the VMM clears its own
    mark after the madvise; while registered, the mark stays for the monitor (or its
    successor) to clear. A fresh registration keeps only the marks of resident pages (a
    discard frozen between announce and madvise: its page is about to be staged) and drops
    the settled ones (holes) -- the torture's seed 39 served a discarded page's old copy when
    every mark was dropped there."""
    with PageState.create(SPECS, P) as state:
        log = DiscardLog(state)
        assert not state.registered
        done = log.announce(0x10000000 + 3 * P, P)
        assert pending_runs(state) == [(3, 4)]
        done(True)
        assert pending_runs(state) == []
        state.registered = True
        done = log.announce(0x10000000 + 9 * P, P)
        done(False)  # the madvise failed: the page may have kept its data, the mark goes
        assert pending_runs(state) == []
        done = log.announce(0x10000000 + 3 * P, P)
        done(True)
        assert pending_runs(state) == [(3, 4)]
        log.announce(0x10000000 + 5 * P, 2 * P)   # in flight: its madvise still to come
        kept = forget_settled(state, lambda a, b: np.isin(np.arange(a, b), [3, 6]))
        # 3: resident but its discard made; 5: a hole; 6: resident and in flight.
        assert kept == 1 and pending_runs(state) == [(6, 7)]


def test_a_discard_made_before_a_registration_keeps_no_mark_on_a_page_filled_since() -> None:
    """The discarder frozen between its madvise (made while nothing was registered: no
    REMOVE) and its flag check, while another thread's read of the hole allocated a zero page
    there: at the fresh registration the page is resident, but its discard is made, so the
    mark goes (kept, a later successor dropped the page the guest wrote next: the torture's
    seed 36). A page resident whose madvise has not returned keeps its mark."""
    with PageState.create(SPECS, P) as state:
        log = DiscardLog(state)
        made = log.announce(0x10000000 + 3 * P, P)
        log.announce(0x10000000 + 8 * P, P)   # frozen before its madvise
        state.discard_made[3] = 1  # its madvise returned; frozen before done() read the flag
        state.registered = True               # the registration, with the VMM frozen
        kept = forget_settled(state, lambda a, b: np.ones(b - a, dtype=np.bool_))
        assert kept == 1 and pending_runs(state) == [(8, 9)]
        made(True)                            # thawed: registered now, it leaves the mark
        assert pending_runs(state) == [(8, 9)]
        again = log.announce(0x10000000 + 3 * P, P)   # a new discard of the page: in flight
        assert int(state.discard_made[3]) == 0 and pending_runs(state) == [(3, 4), (8, 9)]
        again(True)


def test_guest_memory_calls_the_hook_before_and_its_answer_after_the_discard(
        monkeypatch: pytest.MonkeyPatch) -> None:
    memory = GuestMemory.create([(0, 16 * P)], name="hook test")
    try:
        memory.write(2 * P, b"\x07" * P)
        seen: list[str] = []

        def hook(host_addr: int, length: int) -> Callable[[bool], None]:
            seen.append(f"before {memory.read(2 * P, 1)!r}")
            return lambda made: seen.append(f"after {made} {memory.read(2 * P, 1)!r}")

        memory.set_discard_hook(hook)
        memory.discard(2 * P, P)
        assert seen == ["before b'\\x07'", "after True b'\\x00'"]
        memory.write(2 * P, b"\x07" * P)
        seen.clear()

        def failing(*args: object) -> None:
            raise OSError(errno.ENOMEM, "injected madvise failure")

        monkeypatch.setattr(Mapping, "madvise", failing)
        with pytest.raises(OSError, match="injected"):
            memory.discard(2 * P, P)
        assert seen == ["before b'\\x07'", "after False b'\\x07'"]
    finally:
        memory.close()
