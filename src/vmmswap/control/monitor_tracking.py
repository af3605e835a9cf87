"""The monitor's side of dirty tracking: which processes to scan, and when to keep the file.

The data plane knows which pages are clean (:mod:`vmmswap.dataplane.dirty`); only the monitor
knows the processes that map guest memory -- the VMM and every registered device -- so the
scan that finds the pages any of them wrote is made here, at enable, with all of them frozen.
A process whose scan fails or does not cover guest memory makes every page count as written:
tracking only ever saves a copy, it never decides that a page is clean on a guess.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from vmmswap.control.monitor_state import tracks
from vmmswap.dataplane.dirty import TrackingMode, TrackingStats, probe_tracking, scan_process
from vmmswap.uffd.pagemap_scan import Pagemap

if TYPE_CHECKING:
    from vmmswap.control.monitor_faults import UffdEntry, UffdSet
    from vmmswap.control.monitor_state import StateMachine
    from vmmswap.control.thp_restore import HugePageRestorer

_log = logging.getLogger(__name__)

#: What a kept file may hold at most unless the VMM says otherwise: all of guest memory.
UNLIMITED: Final = -1


def tracking_mode(asked: bool) -> tuple[bool, str]:
    """Whether to track, and if not, why (for the status)."""
    if not asked:
        return False, "not asked for (dirty_tracking is off)"
    support = probe_tracking()
    if not support.available:
        return False, support.reason
    return True, ""


class DirtyTracking:
    """Mixin of :class:`~vmmswap.control.monitor.Monitor`: the state machine's tracking hooks."""

    uffds: UffdSet
    machine: StateMachine
    huge_pages: HugePageRestorer
    tracking: bool
    tracking_reason: str
    #: Bytes of swap file a kept file may hold (UNLIMITED: no limit beyond guest memory).
    keep_limit_bytes: int
    #: How long the last enable's dirty scan took.
    scan_seconds: float = 0.0

    def scan_written(self) -> npt.NDArray[np.bool_] | None:
        """The pages any mapping process wrote since their last protection (and protect
        them again), or None when some process's answer cannot be had."""
        handler: Any = self.machine.handler
        start = time.monotonic()
        try:
            written = np.zeros(handler.num_pages, dtype=np.bool_)
            for entry in self.uffds.entries:
                if not self._scan_entry(entry, handler.regions, written):
                    return None
            return written
        finally:
            self.scan_seconds = time.monotonic() - start

    def _scan_entry(self, entry: UffdEntry, regions: Any,
                    written: npt.NDArray[np.bool_]) -> bool:
        if not entry.tracked:
            _log.info("pid %d is not tracked: every page counts as written", entry.pid)
            return False
        try:
            if entry.pagemap is None:
                entry.pagemap = Pagemap.open(entry.pid)
            if scan_process(entry.pagemap, regions, written, entry.uffd.write_protect):
                return True
            _log.warning("pid %d's scan did not cover guest memory: every page counts as "
                         "written", entry.pid)
        except OSError as err:
            _log.warning("scanning pid %d's pagemap failed (%s): every page counts as "
                         "written", entry.pid, err)
        return False

    def may_keep(self) -> bool:
        # A THP guest gets its huge pages back instead (write protection would keep them
        # split, and the collapse needs the registration gone).
        return self.tracking and self.keep_limit_bytes != 0 and not self.huge_pages.pending

    def kept(self) -> None:
        handler = self.machine.handler
        if tracks(handler) and self.keep_limit_bytes != UNLIMITED:
            dropped = handler.limit_kept(self.keep_limit_bytes)
            if dropped:
                _log.info("kept file limited to %d bytes: %d pages lost their copy",
                          self.keep_limit_bytes, dropped)

    def forget_clean(self, why: str) -> None:
        handler = self.machine.handler
        if tracks(handler):
            handler.forget_clean(why)

    def tracking_stats(self) -> TrackingStats:
        handler = self.machine.handler
        if tracks(handler):
            stats: TrackingStats = handler.tracking_stats()
            return dataclasses.replace(stats, scan_seconds=round(self.scan_seconds, 6))
        if self.tracking:
            return TrackingStats(TrackingMode.WP_ASYNC)
        return TrackingStats(TrackingMode.OFF, reason=self.tracking_reason)
