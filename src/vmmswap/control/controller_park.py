"""Detaching the monitor so that the VMM can read guest memory where it lies: park's first step.

A parked VM leaves the host with its memory. When vmm-swap has moved that memory to staging and
the swap file, reading it through the guest's mapping would fault every page back into RAM
first -- the opposite of what swapping it out was for. The VMM already keeps every descriptor
that says where each page is (for a successor monitor, :mod:`.monitor_launch`), so park asks the
monitor to *detach* (``Command.DETACH``: exit without swapping anything in, in a settled state)
and then reads the frozen data plane itself (:class:`~vmmswap.dataplane.parked_image.
ParkedImage`), while the caller keeps every vCPU and device of the VM still.

The controller's watch thread sees the detached monitor exit like a death, and waits for the
park's outcome instead of starting a successor at once:

* the park **committed** (its manifest is in the store): no successor; the controller is
  *parked* -- every later request is refused and ``close`` releases the kept descriptors
  without swapping in (the VM is to be stopped: its memory lives in the store now);
* the park **failed** (store unreachable, killed upload, a step the dead monitor left half
  done): a successor resumes from the kept page state exactly as after a death (a restart in
  the status; not a death for the restart policy), and the VM can run on where it was. The
  failure is re-raised.

A real death while detaching is handled the same way: the monitor is gone either way, and the
reader refuses a page state whose journal names a step in progress.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from vmmswap.control.errors import SwapError, raise_for
from vmmswap.control.monitor_launch import KeptDescriptors, Spare
from vmmswap.control.monitor_process import MonitorProcess
from vmmswap.control.monitor_watch import MonitorWatch
from vmmswap.control.protocol import Command, ProtocolError, Request, request
from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.dataplane.parked_image import ParkedImage
from vmmswap.uffd.userfaultfd import Userfaultfd

__all__ = ["DetachedMemory", "ParkDetach"]

#: Seconds a detached monitor may take to exit (it answers, then leaves its loop at once).
DETACH_TIMEOUT: Final = 30.0


@dataclass
class _Detach:
    """One detach in progress, shared by the parking thread and the watch thread."""

    exited: threading.Event = field(default_factory=threading.Event)
    decided: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    keep_stopped: bool = False
    error: BaseException | None = None


@dataclass
class DetachedMemory:
    """Guest memory while the monitor is away: ``image`` reads it (a MemorySource); call
    :meth:`commit` once the park is safely stored, or the monitor comes back on exit."""

    image: ParkedImage
    committed: bool = False

    def commit(self) -> None:
        self.committed = True


class ParkDetach:
    """A mixin of :class:`~vmmswap.control.controller.SwapController`, whose state it uses
    (declared here; ``_detach`` and ``_parked`` are set up by the controller)."""

    _detach: _Detach | None
    _parked: bool
    _kept: KeptDescriptors
    _memory: GuestMemory
    _uffd: Userfaultfd
    _sock: socket.socket
    _process: MonitorProcess
    _watch: MonitorWatch | None
    _spare: Spare | None
    _lock: threading.Lock
    _changed: threading.Condition
    _closed: bool
    _closing: bool
    _dead: bool
    _planned: set[float]

    _death: BaseException | None

    @contextlib.contextmanager
    def detached(self, timeout: float = DETACH_TIMEOUT) -> Iterator[DetachedMemory]:
        """Detach the monitor and yield the guest's memory as it lies (see the module doc).

        The caller must keep the VM's vCPUs and devices from touching guest memory for the
        whole block. SwapStateError when the monitor refuses (a command is running, or swap
        failed); SwapError when this controller cannot park (no watch thread, no page state).
        """
        kept = self._kept
        if self._watch is None or kept.page_state is None:
            raise SwapError("parking from the data plane needs the monitor restart machinery "
                            "(a restart policy) and a page-state memfd")
        d = _Detach()
        with self._changed:
            refusal = self._park_refusal()
            if refusal is None and (self._closed or self._closing or self._dead):
                refusal = "the swap controller is closed or its monitor is dead"
            if refusal is not None:
                raise SwapError(refusal)
            self._detach = d
        try:
            self._send_detach(d)
            if not d.exited.wait(timeout):
                self._process.kill()   # it answered but did not leave: it may not serve again
                if not d.exited.wait(timeout):
                    raise SwapError("the detached monitor did not exit")
            memory = DetachedMemory(ParkedImage(kept.page_state, list(zip(
                self._memory.specs(), self._memory.memfds(), strict=True)), kept.staging_fd,
                kept.swap_fd))
        except BaseException:
            self._end_detach(d, keep_stopped=False)
            raise
        try:
            yield memory
        except BaseException:
            self._end_detach(d, keep_stopped=False)
            raise
        self._end_detach(d, keep_stopped=memory.committed)

    def _park_refusal(self) -> str | None:
        if self._parked:
            return "the VM is parked: its memory left this host; nothing here serves it"
        if self._detach is not None:
            return "the VM is being parked (the monitor is detached)"
        return None

    def _send_detach(self, d: _Detach) -> None:
        try:
            with self._lock:
                response = request(self._sock, Request(Command.DETACH))
        except (ConnectionError, BrokenPipeError, ProtocolError, OSError):
            return   # it died with the request: the watch thread sees it gone (a detach too)
        try:
            raise_for(response)
        except BaseException:
            with self._changed:
                if not d.exited.is_set():
                    self._detach = None   # refused and still serving: nothing to undo
                    d.finished.set()
            raise

    def _end_detach(self, d: _Detach, *, keep_stopped: bool) -> None:
        """Hand the outcome to the watch thread and wait for it: no monitor, or a successor."""
        if d.finished.is_set():
            return
        with self._changed:
            if not d.exited.is_set():
                # The monitor never went (refused after all, or too slow): forget the detach;
                # a later exit is a death like any other.
                self._detach = None
                d.finished.set()
                return
            d.keep_stopped = keep_stopped
            d.decided.set()
        d.finished.wait()
        if keep_stopped:
            self._parked = True
        elif d.error is not None:
            raise SwapError(f"no monitor took over after the park was called off: {d.error}; "
                            "the VM must not run") from d.error

    def _detach_outcome(self, d: _Detach) -> bool:
        """From the watch thread (``_monitor_exited``): the monitor is gone. Wait for the
        park's outcome: True when the VM stays parked (no successor)."""
        with self._changed:
            d.exited.set()
            self._changed.notify_all()
        d.decided.wait()
        if d.keep_stopped and self._spare is not None:
            self._spare.close()
            self._spare = None
        return d.keep_stopped

    def _detach_finished(self, d: _Detach) -> None:
        """The successor serves (or none could: the controller gave up, ``d.error``)."""
        with self._changed:
            if self._dead and not d.keep_stopped:
                d.error = self._death
            self._detach = None
            d.finished.set()
            self._changed.notify_all()

    def _close_parked(self) -> None:
        """Close a parked controller: no monitor to ask, nothing to swap in (the memory is in
        the store; the VM is being stopped), so the kept descriptors and the uffd just go."""
        if self._watch is not None:
            self._watch.stop()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        with self._lock:
            self._sock.close()
            with contextlib.suppress(Exception):
                self._process.wait(timeout=5)
            if self._spare is not None:
                self._spare.close()
                self._spare = None
            self._kept.close()
            self._uffd.close()
