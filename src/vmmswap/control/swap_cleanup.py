"""Shrinking the swap file after ``disable``: at once, or a step at a time.

Why gradual (crosvm commit 5006e9601): truncating a large file in one go causes a burst of
metadata I/O that competes with whatever the user is doing right after ``disable`` (an app
launch). ``disable --slow-file-cleanup`` shrinks it by :data:`TRUNCATE_STEP` every
:data:`TRUNCATE_INTERVAL` seconds instead; a new ``enable`` (or a fast ``disable``) finishes the
job at once, since the page handler starts from an empty file.

The truncator is driven by the monitor's event loop (:meth:`FileTruncator.tick`), not a thread.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Final

_log = logging.getLogger(__name__)

TRUNCATE_STEP: Final = 64 * 1024 * 1024
TRUNCATE_INTERVAL: Final = 5.0


class FileTruncator:
    """Truncates the swap file; does not own the descriptor."""

    def __init__(self, fd: int, step: int | None = None, interval: float | None = None) -> None:
        self._fd = fd
        self.step = step if step is not None else int(
            os.environ.get("VMMSWAP_TRUNCATE_STEP", TRUNCATE_STEP))
        self.interval = interval if interval is not None else float(
            os.environ.get("VMMSWAP_TRUNCATE_INTERVAL", TRUNCATE_INTERVAL))
        self._next: float | None = None

    @property
    def running(self) -> bool:
        return self._next is not None

    def start(self) -> None:
        """Begin shrinking step by step (the first step comes after one interval)."""
        if self._size() == 0:
            self._next = None
            return
        self._next = time.monotonic() + self.interval

    def finish(self) -> None:
        """Truncate to zero now (also ends a gradual cleanup)."""
        self._next = None
        self._truncate(0)

    def tick(self) -> None:
        """Run a step if one is due."""
        if self._next is None or time.monotonic() < self._next:
            return
        size = self._size()
        new_size = max(0, size - self.step)
        self._truncate(new_size)
        self._next = None if new_size == 0 else time.monotonic() + self.interval

    def next_step_in(self) -> float | None:
        if self._next is None:
            return None
        return max(0.0, self._next - time.monotonic())

    def _size(self) -> int:
        try:
            return os.fstat(self._fd).st_size
        except OSError:
            return 0

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as err:
            # Only disk space is at stake, never guest data: log it like crosvm does.
            _log.warning("truncating the swap file to %d bytes failed: %s", size, err)

    def close(self) -> None:
        self._next = None
