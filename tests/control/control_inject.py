"""Fault injection around any page handler, for the failure-policy tests.

Loaded into the monitor with ``VMMSWAP_TEST_HANDLER_FACTORY=control_inject:factory``; the
handler it wraps comes from ``INJECT_BASE`` ("module:function", or empty for the data plane's).

* ``INJECT_EIO_OUT_AFTER=N``: swap_out raises EIO once N chunks were written (nothing written by
  that call: the state stays consistent, as the data plane promises for real I/O errors);
* ``INJECT_EIO_MOVE=1``: move_to_staging does the real move, then raises EIO -- the worst case
  for Failed: every page is out of guest memory and the move is reported failed;
* ``INJECT_EIO_FAULTS=N``: the first N page faults fail with EIO before anything is filled
  (a swap-file read error): the monitor must keep those threads blocked and retry;
* ``INJECT_EIO_PWRITE_AT=N``: the N-th write to the swap file (1-based, counting every
  ``pwrite`` the data plane makes: swap-out and trim rewrites) writes half its bytes, then fails
  with EIO -- a disk that dies in the middle of a write, below the data plane's commit point;
* ``INJECT_FAULT_DELAY_MS=T``: every page fault waits T ms before it is served, so a test can
  catch a faulting process in the middle of its fault (and kill it there);
* ``INJECT_OUT_CHUNK_DELAY_MS=T``: every swap-out chunk takes T ms longer (a slow disk);
* ``INJECT_EVENT_LOG=PATH``: append one line per event to PATH (``out-begin``, ``out-end N``,
  ``in-step N``, ``fault ADDR``), in the order the monitor handled them, for tests of that order;
* ``INJECT_BUG_REMOVE=1``: every REMOVE event raises RuntimeError -- a bug, not an I/O error:
  the monitor must survive it and keep serving faults;
* ``INJECT_SLOW_MOVE_MS=T``: the move to staging waits T ms first (the VMM is frozen and the
  control area says the move began: a monitor killed then leaves a half-done enable);
* ``INJECT_CRASH_AT=N`` with ``INJECT_CRASH_TOKEN=PATH``: the monitor SIGKILLs itself at the
  N-th data-plane crash point it passes (``dataplane.crash_points``: between two steps of a
  state change) -- once per token: the process that manages to unlink PATH dies, so a
  successor inheriting the setting does not die again unless the test re-creates the file;
* negative controls of the restart, for a successor monitor: ``INJECT_SKIP_WAKE=1`` skips the
  UFFDIO_WAKE of every range; ``INJECT_FRESH_ON_RESUME=1`` builds a fresh handler instead of
  resuming the page state.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import os
import signal
import time
from typing import Any

import numpy as np

from vmmswap.control import monitor_registration
from vmmswap.control.monitor import default_handler_factory
from vmmswap.control.monitor_resume import HandlerSetup
from vmmswap.dataplane import crash_points


class Injected:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._chunks = 0
        self._out_after = int(os.environ.get("INJECT_EIO_OUT_AFTER", "-1"))
        self._move = os.environ.get("INJECT_EIO_MOVE") == "1"
        self._fault_errors = int(os.environ.get("INJECT_EIO_FAULTS", "0"))
        self._remove_bug = os.environ.get("INJECT_BUG_REMOVE") == "1"
        self._fault_delay = float(os.environ.get("INJECT_FAULT_DELAY_MS", "0")) / 1000
        self._chunk_delay = float(os.environ.get("INJECT_OUT_CHUNK_DELAY_MS", "0")) / 1000
        log = os.environ.get("INJECT_EVENT_LOG")
        self._log = (os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                     if log else -1)

    def _event(self, what: str) -> None:
        if self._log >= 0:
            os.write(self._log, f"{what}\n".encode())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def swap_out(self, max_bytes: int = 2 << 20) -> int:
        if self._chunks == self._out_after:
            raise OSError(errno.EIO, "injected I/O error writing the swap file")
        self._event("out-begin")
        if self._chunk_delay:
            time.sleep(self._chunk_delay)
        written: int = self._inner.swap_out(max_bytes)
        self._event(f"out-end {written}")
        self._chunks += 1
        return written

    def handle_page_fault(self, uffd: Any, addr: int, write: bool = False) -> None:
        if self._fault_errors > 0:
            self._fault_errors -= 1
            raise OSError(errno.EIO, "injected I/O error reading the swap file")
        if self._fault_delay:
            time.sleep(self._fault_delay)
        self._event(f"fault {addr:#x}")
        self._inner.handle_page_fault(uffd, addr, write)

    def start_swap_in(self) -> Any:
        return _LoggedSwapIn(self._inner.start_swap_in(), self._event)

    def handle_remove(self, start: int, end: int) -> None:
        if self._remove_bug:
            raise RuntimeError(f"injected bug handling REMOVE [{start:#x}, {end:#x})")
        self._inner.handle_remove(start, end)

    def release_clean(self, written: Any) -> int:
        """INJECT_SKIP_WRITTEN=1: drop one page from the dirty scan's answer (the first page
        that is both written and clean) -- the negative control of dirty tracking."""
        if os.environ.get("INJECT_SKIP_WRITTEN") == "1" and written is not None:
            both = np.flatnonzero(written & self._inner.clean.bits.bools(0, len(written)))
            if both.size:
                written[int(both[0])] = False
                self._event(f"skipped written page {int(both[0])}")
        released: int = self._inner.release_clean(written)
        return released

    def move_to_staging(self) -> int:
        time.sleep(float(os.environ.get("INJECT_SLOW_MOVE_MS", "0")) / 1000)
        moved: int = self._inner.move_to_staging()
        if self._move:
            raise OSError(errno.EIO, f"injected failure after moving {moved} pages")
        return moved


class _LoggedSwapIn:
    """A swap-in context that logs each chunk (``in-step N``) for the event-order tests."""

    def __init__(self, inner: Any, event: Any) -> None:
        self._inner = inner
        self._event = event

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def swap_in(self, uffd: Any, max_bytes: int) -> int:
        pages: int = self._inner.swap_in(uffd, max_bytes)
        self._event(f"in-step {pages}")
        return pages


_CRASH_HOOKED = False


def _arm_crash() -> None:
    """Install the self-kill at the N-th crash point (see INJECT_CRASH_AT), once."""
    global _CRASH_HOOKED
    at, token = int(os.environ.get("INJECT_CRASH_AT", "0")), os.environ.get("INJECT_CRASH_TOKEN")
    if _CRASH_HOOKED or at <= 0 or not token:
        return
    _CRASH_HOOKED = True
    passed = 0

    def hook(_name: str) -> None:
        nonlocal passed
        passed += 1
        if passed < at:
            return
        try:
            os.unlink(token)
        except OSError:
            return  # disarmed, or another monitor took the token
        os.write(2, f"injected: monitor {os.getpid()} killed at crash point {_name}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)

    crash_points.set_hook(hook)


def factory(setup: HandlerSetup) -> Any:
    _arm_crash()
    if setup.resume and os.environ.get("INJECT_SKIP_WAKE") == "1":
        monitor_registration.wake_all = lambda *_: 0  # looked up at call time, after this ran
    if setup.resume and os.environ.get("INJECT_FRESH_ON_RESUME") == "1":
        setup = dataclasses.replace(setup, resume=False)
    base = os.environ.get("INJECT_BASE", "")
    if base:
        module, _, name = base.partition(":")
        inner = getattr(importlib.import_module(module), name)(setup)
    else:
        inner = default_handler_factory(setup)
    pwrite_at = int(os.environ.get("INJECT_EIO_PWRITE_AT", "0"))
    if pwrite_at > 0:
        _fail_pwrite(inner, pwrite_at)
    return Injected(inner)


def _fail_pwrite(handler: Any, at: int) -> None:
    """Make the ``at``-th swap-file write of ``handler`` tear: half written, then EIO. Both
    write paths count: from a buffer (``_pwrite_all``) and straight from the staging mapping
    (``_pwritev_all``)."""
    swap_file = handler.swap_file
    real = swap_file._pwrite_all
    real_v = swap_file._pwritev_all
    calls = 0

    def tear(offset: int, half: int) -> None:
        raise OSError(errno.EIO, f"injected I/O error: swap file write {at} torn at "
                                 f"{offset + half:#x}")

    def torn(data: memoryview, offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls != at:
            real(data, offset)
            return
        half = (data.nbytes // 2) & ~0xFFF
        if half:
            real(data[:half], offset)
        tear(offset, half)

    def torn_v(iov: list[memoryview], offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls != at:
            real_v(iov, offset)
            return
        total = sum(v.nbytes for v in iov)
        half = (total // 2) & ~0xFFF
        kept: list[memoryview] = []
        left = half
        for v in iov:
            if left <= 0:
                break
            kept.append(v[:left])
            left -= min(left, v.nbytes)
        if kept:
            real_v(kept, offset)
        tear(offset, half)

    swap_file._pwrite_all = torn
    swap_file._pwritev_all = torn_v
