"""Fault injection around any page handler, for the failure-policy tests.

Loaded into the monitor with ``VMMSWAP_TEST_HANDLER_FACTORY=control_inject:factory``; the
handler it wraps comes from ``INJECT_BASE`` ("module:function", or empty for the data plane's).

* ``INJECT_EIO_OUT_AFTER=N``: swap_out raises EIO once N chunks were written (nothing written by
  that call: the state stays consistent, as the data plane promises for real I/O errors);
* ``INJECT_EIO_MOVE=1``: move_to_staging does the real move, then raises EIO -- the worst case
  for Failed: every page is out of guest memory and the move is reported failed;
* ``INJECT_EIO_FAULTS=N``: the first N page faults fail with EIO before anything is filled
  (a swap-file read error): the monitor must keep those threads blocked and retry;
* ``INJECT_BUG_REMOVE=1``: every REMOVE event raises RuntimeError -- a bug, not an I/O error:
  the monitor must survive it and keep serving faults.
"""

from __future__ import annotations

import errno
import importlib
import os
from collections.abc import Sequence
from typing import Any

from vmmswap.control.monitor import default_handler_factory
from vmmswap.dataplane.guest_memory import RegionSpec


class Injected:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._chunks = 0
        self._out_after = int(os.environ.get("INJECT_EIO_OUT_AFTER", "-1"))
        self._move = os.environ.get("INJECT_EIO_MOVE") == "1"
        self._fault_errors = int(os.environ.get("INJECT_EIO_FAULTS", "0"))
        self._remove_bug = os.environ.get("INJECT_BUG_REMOVE") == "1"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def swap_out(self, max_bytes: int = 2 << 20) -> int:
        if self._chunks == self._out_after:
            raise OSError(errno.EIO, "injected I/O error writing the swap file")
        written: int = self._inner.swap_out(max_bytes)
        self._chunks += 1
        return written

    def handle_page_fault(self, uffd: Any, addr: int, write: bool = False) -> None:
        if self._fault_errors > 0:
            self._fault_errors -= 1
            raise OSError(errno.EIO, "injected I/O error reading the swap file")
        self._inner.handle_page_fault(uffd, addr, write)

    def handle_remove(self, start: int, end: int) -> None:
        if self._remove_bug:
            raise RuntimeError(f"injected bug handling REMOVE [{start:#x}, {end:#x})")
        self._inner.handle_remove(start, end)

    def move_to_staging(self) -> int:
        moved: int = self._inner.move_to_staging()
        if self._move:
            raise OSError(errno.EIO, f"injected failure after moving {moved} pages")
        return moved


def factory(regions: Sequence[tuple[RegionSpec, int]], swap_fd: int, readahead: bool) -> Any:
    base = os.environ.get("INJECT_BASE", "")
    if base:
        module, _, name = base.partition(":")
        inner = getattr(importlib.import_module(module), name)(regions, swap_fd, readahead)
    else:
        inner = default_handler_factory(regions, swap_fd, readahead)
    return Injected(inner)
