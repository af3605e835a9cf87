"""The monitor's userfaultfds: the VMM's, and one per registered device process.

Serving faults is the monitor's first duty, so everything here is about never leaving a fault
unanswered and never answering one wrongly:

* events are drained until the descriptor is empty (a read returns at most a batch);
* a fill that meets a changing address space (MappingChangingError) is retried after the uffd's
  pending events (REMOVEs) have been read, as the kernel requires;
* a fault that cannot be served (the swap file cannot be read) is *not* answered: its thread
  stays blocked, the error is reported in the status, and the fault is retried later. Waking it
  without a fill would make the kernel allocate a zero page where guest data was.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from vmmswap.control.monitor_state import PageHandlerLike
from vmmswap.dataplane.dirty import DIRTY_TRACKING_FEATURES
from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.kernel.uffd import RegisterMode
from vmmswap.uffd.errors import (
    MappingChangingError,
    PageExistsError,
    ProcessGoneError,
)
from vmmswap.uffd.events import Fork, PageFault, Remove
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagemap_scan import Pagemap
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import ForkedUffd, Userfaultfd

_log = logging.getLogger(__name__)

#: Fills retried in one go after reading events; beyond that the fault waits for the next round.
_CHANGING_RETRIES: Final = 16
#: How often a fault that failed for another reason is tried again.
STUCK_RETRY_INTERVAL: Final = 1.0


@dataclass(eq=False)
class UffdEntry:
    """One uffd the monitor serves. ``pidfd`` is set for device processes (None for the VMM)."""

    uffd: Userfaultfd
    pid: int
    pidfd: int | None = None
    main: bool = False
    registered: bool = False
    #: Registered MISSING | WP (dirty tracking); False also when the uffd lacks the features.
    tracked: bool = False
    #: The process's pagemap, opened at the first dirty scan.
    pagemap: Pagemap | None = None

    @property
    def fd(self) -> int:
        return self.uffd.fileno()

    def close(self) -> None:
        self.uffd.close()
        if self.pagemap is not None:
            self.pagemap.close()
            self.pagemap = None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


@dataclass
class _Stuck:
    entry: UffdEntry
    fault: PageFault
    error: str
    next_try: float = field(default=0.0)


class VmmGoneError(Exception):
    """The VMM's own uffd reports that its process has exited: the monitor must stop."""


class UffdSet:
    """Every uffd being served, the regions they cover, and the fault-serving logic."""

    def __init__(self, regions: Sequence[RegionSpec], main: UffdEntry,
                 handler: Callable[[], PageHandlerLike | None],
                 on_drop: Callable[[UffdEntry], None],
                 page_sizes: Sequence[int] | None = None, *, track: bool = False,
                 unheld_remove: Callable[[int, int], None] | None = None) -> None:
        self.regions = tuple(regions)
        #: Register MISSING | WP, for dirty tracking (see vmmswap.dataplane.dirty).
        self.track = track
        #: Each region's page (2 MiB on hugetlbfs, where a fault is answered whole, by COPY).
        self.page_sizes = tuple(page_sizes) if page_sizes is not None else (
            (PAGE_SIZE,) * len(self.regions))
        self._zeros: Mapping | None = None
        self.main = main
        self.devices: list[UffdEntry] = []
        self._handler = handler
        self._on_drop = on_drop
        #: A REMOVE ``[start, end)`` no handler applied (none holds a copy, or it failed):
        #: its discard marks (vmmswap.dataplane.discard_log) must still go.
        self._unheld_remove = unheld_remove
        self._stuck: deque[_Stuck] = deque()
        self.last_error: str | None = None

    @property
    def entries(self) -> list[UffdEntry]:
        return [self.main, *self.devices]

    # --- registration -------------------------------------------------------------------------
    def register(self, entry: UffdEntry) -> None:
        """Register every region on ``entry``'s uffd (MISSING mode; MISSING | WP when tracking,
        or MISSING alone when that uffd lacks the WP features: its process's pages then always
        count as written, see :mod:`.monitor_tracking`).

        **Safety**: from here on, missing pages of guest memory in that process are filled only
        by the monitor; the caller must serve this uffd's faults for as long as it stays
        registered. ProcessGoneError if its process is gone; any other OSError leaves nothing
        registered.
        """
        if entry.registered:
            return
        done: list[RegionSpec] = []
        # Only a uffd whose creator enabled WP_ASYNC may be registered for WP: the kernel
        # accepts WP on one without, and its writes would then wait for this monitor.
        wp = self.track and DIRTY_TRACKING_FEATURES in entry.uffd.features
        if self.track and not wp:
            _log.warning("pid %d's uffd lacks the write-protect features: its writes are not "
                         "tracked, every page counts as written", entry.pid)
        mode = RegisterMode.MISSING | RegisterMode.WP if wp else RegisterMode.MISSING
        try:
            for spec in self.regions:
                entry.uffd.register(spec.host_addr, spec.size, mode)
                done.append(spec)
        except OSError:
            for spec in done:
                try:
                    entry.uffd.unregister(spec.host_addr, spec.size)
                except OSError as err:
                    _log.warning("rolling back a registration failed: %s", err)
            raise
        entry.registered = True
        entry.tracked = entry.uffd.write_protect_fills = wp

    def register_all(self) -> None:
        """Register every uffd; dead devices are dropped, any other failure undoes it all."""
        newly: list[UffdEntry] = []
        try:
            for entry in self.entries:
                if entry.registered:
                    continue
                try:
                    self.register(entry)
                except ProcessGoneError:
                    if entry.main:
                        raise
                    self.drop(entry)
                    continue
                newly.append(entry)
        except OSError:
            for entry in newly:
                self.unregister(entry)
            raise

    def unregister(self, entry: UffdEntry, force: bool = False) -> None:
        """Unregister ``entry``'s ranges; ``force`` also when it is not known to be
        registered (a successor undoing a registration its predecessor's death cut short:
        ranges not registered are skipped by the kernel)."""
        if not entry.registered and not force:
            return
        entry.registered = entry.tracked = entry.uffd.write_protect_fills = False
        for spec in self.regions:
            try:
                entry.uffd.unregister(spec.host_addr, spec.size)
            except ProcessGoneError:
                return
            except OSError as err:
                # Still registered: stray faults there are answered (zero-filled) while Ready.
                _log.error("unregistering pid %d's uffd failed: %s", entry.pid, err)

    def unregister_all(self, force: bool = False) -> None:
        for entry in self.entries:
            self.unregister(entry, force)

    # --- devices ------------------------------------------------------------------------------
    def add_device(self, entry: UffdEntry, enabled: bool) -> None:
        """Start serving a device's uffd; registered at once when swap is enabled."""
        if enabled:
            self.register(entry)
        self.devices.append(entry)

    def drop(self, entry: UffdEntry) -> None:
        """Stop serving a dead device; its pending REMOVE events are applied first."""
        if entry not in self.devices:
            return
        with contextlib.suppress(OSError):
            self.drain(entry)
        self.devices.remove(entry)
        self._stuck = deque(s for s in self._stuck if s.entry is not entry)
        self._on_drop(entry)
        entry.close()

    # --- events -------------------------------------------------------------------------------
    def drain(self, entry: UffdEntry) -> list[PageFault]:
        """Read every pending event of ``entry``; apply REMOVEs now, return the faults."""
        faults: list[PageFault] = []
        while True:
            try:
                events = entry.uffd.read_events()
            except ValueError:
                return faults  # the descriptor was closed under us: nothing more to read
            except OSError as err:
                if err.errno in (errno.EBADF, errno.EINVAL):
                    return faults
                raise
            if not events:
                return faults
            for event in events:
                if isinstance(event, PageFault):
                    faults.append(event)
                elif isinstance(event, Remove):
                    self._remove(event)
                elif isinstance(event, ForkedUffd):
                    event.uffd.close()  # EVENT_FORK is never requested; do not leak it
                elif isinstance(event, Fork):
                    os.close(event.fd)
                else:
                    _log.warning("ignoring unexpected uffd event %r from pid %d", event,
                                 entry.pid)

    def _remove(self, event: Remove) -> None:
        handler = self._handler()
        if handler is None:
            # crosvm b/272620051: REMOVE may arrive after unregistering; nothing is held, but
            # the discard's marks are: left set, they would outlive it and drop the copies of
            # pages written since at a successor's recovery (a zero page served).
            if self._unheld_remove is not None:
                self._unheld_remove(event.start, event.end)
            return
        try:
            handler.handle_remove(event.start, event.end)
        except Exception as err:
            # Nothing is lost by not forgetting: the range keeps its old copy, which a guest
            # that gave the pages away accepts as well as zeros. Raising instead would drop the
            # faults read in the same batch, and each of those is a blocked thread. Its marks
            # go, though: kept, they would outlive the discard, and a page written again and
            # staged later would be dropped by a successor's recovery (a zero page).
            if self._unheld_remove is not None:
                self._unheld_remove(event.start, event.end)
            self.last_error = f"handling REMOVE [{event.start:#x}, {event.end:#x}): {err}"
            _log.error("%s", self.last_error, exc_info=not isinstance(err, OSError))

    def report(self, message: str, *, traceback: bool, aside: str = "") -> None:
        """Make ``message`` the error the status shows, and log it once (not at every retry
        of the same fault). Call it from the ``except`` block that caught the error."""
        if self.last_error != message:
            _log.error("%s%s", message, aside, exc_info=traceback)
        self.last_error = message

    def serve(self, entry: UffdEntry) -> int:
        """Drain ``entry`` and serve its faults; returns how many faults were seen."""
        faults = deque(self.drain(entry))
        seen = len(faults)
        retries = 0
        try:
            while faults:
                fault = faults.popleft()
                outcome = self._serve_one(entry, fault)
                if outcome == "changing":
                    retries += 1
                    faults.appendleft(fault)  # first again, and kept if reading events fails
                    more = self.drain(entry)
                    seen += len(more)
                    for new in reversed(more):  # right after it, before the older ones
                        faults.insert(1, new)
                    if retries > _CHANGING_RETRIES:
                        self._stuck.append(_Stuck(entry, faults.popleft(), "address space "
                                                  "changing", time.monotonic()))
                elif outcome == "gone":
                    if entry.main:
                        raise VmmGoneError(f"the VMM (pid {entry.pid}) has exited")
                    self.drop(entry)
                    return seen
        except VmmGoneError:
            raise
        except Exception as err:
            # The kernel never sends a fault twice: every one read and not yet served is a
            # thread that would otherwise stay blocked for good. Keep them for a retry.
            later = time.monotonic() + STUCK_RETRY_INTERVAL
            self._stuck.extend(_Stuck(entry, f, f"interrupted: {err!r}", later) for f in faults)
            raise
        return seen

    def _serve_one(self, entry: UffdEntry, fault: PageFault) -> str:
        handler = self._handler()
        try:
            if handler is None:
                self._answer_while_disabled(entry, fault)
            else:
                handler.handle_page_fault(entry.uffd, fault.address, fault.write)
        except MappingChangingError:
            return "changing"
        except ProcessGoneError:
            return "gone"
        except Exception as err:
            message = f"cannot serve the fault at {fault.address:#x} of pid {entry.pid}: {err}"
            # A non-OSError is a bug somewhere: keep its traceback.
            self.report(message, traceback=not isinstance(err, OSError),
                        aside=" (the thread stays blocked; retrying)")
            self._stuck.append(_Stuck(entry, fault, message,
                                      time.monotonic() + STUCK_RETRY_INTERVAL))
        return "done"

    def _page_size_at(self, addr: int) -> int:
        for spec, size in zip(self.regions, self.page_sizes, strict=True):
            if spec.host_addr <= addr < spec.host_end:
                return size
        return PAGE_SIZE

    def _answer_while_disabled(self, entry: UffdEntry, fault: PageFault) -> None:
        """A fault while Ready means the range is still registered (a failed unregister):
        every page is back in guest memory then, so a missing page really is a zero page."""
        size = self._page_size_at(fault.address)
        addr = fault.address & ~(size - 1)
        try:
            if size == PAGE_SIZE:
                entry.uffd.zero(addr, size)
            else:
                # hugetlbfs has no ZEROPAGE: copy a whole huge page of zeros.
                if self._zeros is None or self._zeros.length < size:
                    self._zeros = Mapping.anonymous(size, populate=True)
                entry.uffd.copy(addr, size, self._zeros.address)
        except PageExistsError:
            entry.uffd.wake(addr, size)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
            # Not registered any more: a fault queued while the range was being unregistered
            # (see Userfaultfd.unregister). Woken, the thread faults as on plain memory.
            entry.uffd.wake(addr, size)

    def retry_stuck(self) -> None:
        """Try the faults that failed earlier again, once their retry time has come."""
        now = time.monotonic()
        due = [s for s in self._stuck if s.next_try <= now]
        if not due:
            return
        self._stuck = deque(s for s in self._stuck if s.next_try > now)
        for i, stuck in enumerate(due):
            try:
                self._retry_one(stuck, now)
            except VmmGoneError:
                raise
            except Exception:
                # Those not retried yet (this one included) must not be forgotten.
                for rest in due[i:]:
                    rest.next_try = now + STUCK_RETRY_INTERVAL
                    self._stuck.append(rest)
                raise

    def _retry_one(self, stuck: _Stuck, now: float) -> None:
        if stuck.entry.uffd.closed:
            return
        outcome = self._serve_one(stuck.entry, stuck.fault)
        if outcome == "changing":
            # Read the events the kernel wants read first; new faults among them join the
            # queue (none may be dropped: each is a blocked thread).
            self._stuck.extend([_Stuck(stuck.entry, f, "new", now)
                                for f in self.drain(stuck.entry)])
            stuck.next_try = now
            self._stuck.append(stuck)
        elif outcome == "gone":
            if stuck.entry.main:
                raise VmmGoneError(f"the VMM (pid {stuck.entry.pid}) has exited")
            self.drop(stuck.entry)

    @property
    def stuck_count(self) -> int:
        return len(self._stuck)

    def next_retry_in(self) -> float | None:
        if not self._stuck:
            return None
        return max(0.0, min(s.next_try for s in self._stuck) - time.monotonic())

    def close(self) -> None:
        for entry in list(self.devices):
            self.devices.remove(entry)
            entry.close()
        self.main.close()
