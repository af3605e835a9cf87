"""The vmm-swap state machine: crosvm's seven states and their transitions, without any I/O.

The monitor (``monitor.py``) owns sockets, epoll and the uffds; this module decides what a command
does in each state and runs the resumable work (trim, swap out, swap in) one chunk at a time, so
the monitor's single thread serves page faults between chunks. Keeping it free of I/O is what lets
the tests drive every transition with a fake page handler.

Differences from crosvm, on purpose:

* A command in the wrong state raises :class:`CommandError` (the caller sees the reason) where
  crosvm only logs a warning and the caller never learns the command was ignored.
* A failed swap-in (the file cannot be read back) leaves the state Failed with the pages still
  in staging/file, instead of crashing the monitor (which would strand them for good).
* ``disable`` while already Ready succeeds (nothing to do, or finishes a slow file cleanup now).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import fields
from typing import Any, Final, Protocol, TypeGuard

from vmmswap.control.protocol import ErrorKind
from vmmswap.control.status import SwapMetrics, SwapState, SwapStateTransition, SwapStatus
from vmmswap.uffd.errors import MappingChangingError, ProcessGoneError
from vmmswap.uffd.pagesize import PAGE_SIZE

_log = logging.getLogger(__name__)

#: crosvm's chunk sizes: 2 MiB per swap-out / swap-in step, 1024 pages per trim step.
MAX_SWAP_CHUNK: Final = 2 * 1024 * 1024
MAX_TRIM_PAGES: Final = 1024


class TrimContextLike(Protocol):
    def trim_pages(self, max_pages: int = ...) -> int | None: ...


class SwapInContextLike(Protocol):
    def swap_in(self, uffd: Any, max_bytes: int = ...) -> int: ...
    def close(self) -> None: ...


class PageHandlerLike(Protocol):
    """The part of ``PageHandler`` the state machine and the monitor use."""

    def move_to_staging(self) -> int: ...
    def handle_page_fault(self, uffd: Any, addr: int, write: bool = ...) -> None: ...
    def handle_remove(self, start: int, end: int) -> None: ...
    def start_trim(self) -> TrimContextLike: ...
    def swap_out(self, max_bytes: int = ...) -> int: ...
    def start_swap_in(self) -> SwapInContextLike: ...
    def metrics(self) -> Any: ...
    def close(self) -> None: ...


class CommandError(Exception):
    """A command was refused (``kind`` STATE: nothing changed) or failed (``kind`` FAILED)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Hooks(Protocol):
    """What the state machine needs from the monitor around it."""

    def create_handler(self) -> PageHandlerLike: ...
    def freeze(self) -> AbstractContextManager[object]: ...
    def register_all(self) -> None: ...
    def unregister_all(self) -> None: ...
    def main_uffd(self) -> Any: ...
    def resident_pages(self) -> int: ...
    def disabled(self, slow_file_cleanup: bool) -> None: ...
    def scan_written(self) -> Any:
        """Dirty tracking: the pages any mapping process wrote (a bool per page), or None."""
    def may_keep(self) -> bool:
        """Dirty tracking: whether the swap file may be kept after a disable."""
    def kept(self) -> None:
        """Dirty tracking: a disable ended keeping the swap file and the registrations."""


class TrackingHandlerLike(PageHandlerLike, Protocol):
    """A page handler doing dirty tracking (see vmmswap.dataplane.dirty)."""

    def release_clean(self, written: Any) -> int: ...
    def forget_clean(self, why: str) -> None: ...
    def tracking_stats(self) -> Any: ...
    def limit_kept(self, max_bytes: int) -> int: ...


def tracks(handler: PageHandlerLike | None) -> TypeGuard[TrackingHandlerLike]:
    """Whether ``handler`` does dirty tracking (the data plane's PageHandler with it on)."""
    return getattr(handler, "clean", None) is not None


class _Transition:
    """The running or last transition record: pages and elapsed time."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.pages = 0
        self._start: float | None = None
        self._elapsed = 0.0

    def begin(self) -> None:
        self.pages, self._start, self._elapsed = 0, self._clock(), 0.0

    def end(self) -> None:
        if self._start is not None:
            self._elapsed = self._clock() - self._start
            self._start = None

    def reset(self) -> None:
        self.pages, self._start, self._elapsed = 0, None, 0.0

    def snapshot(self) -> SwapStateTransition:
        elapsed = self._elapsed if self._start is None else self._clock() - self._start
        return SwapStateTransition(self.pages, int(elapsed * 1000))


def _call_optional(handler: PageHandlerLike, name: str, what: str, **kwargs: Any) -> None:
    """Call a handler's optional speed-up hook (``prepare_move``, ``release_prepared``):
    handlers without it, and any failure of it, leave the enable as it was without it."""
    hook = getattr(handler, name, None)
    if hook is None:
        return
    try:
        hook(**kwargs)
    except Exception as err:
        _log.warning("enable: %s failed (the move does without): %s", what, err)


class StateMachine:
    """One VM's swap state. Every method runs on the monitor's single thread."""

    def __init__(self, hooks: Hooks, clock: Callable[[], float] = time.monotonic, *,
                 page_size: int = PAGE_SIZE,
                 journal: Callable[[StateMachine], None] | None = None) -> None:
        self._hooks = hooks
        #: Called after every change a successor must know of (see control/restart_area.py).
        self._journal = journal
        #: How far the running enable got (restart_area.EnablePhase values), and the state
        #: before it: a successor treats a half-done enable by these.
        self.enable_phase = 0
        self.prior_state = SwapState.READY
        #: A gradual file cleanup was asked by the last disable and may still be running.
        self.slow_cleanup_asked = False
        #: The guest's page (2 MiB on hugetlbfs): the unit of every page count reported.
        self.page_size = page_size
        self.state = SwapState.READY
        self.handler: PageHandlerLike | None = None
        self._clock = clock
        #: How long the last enable kept the VMM tree frozen (freeze done to thaw done).
        self.frozen_seconds = 0.0
        self.transition = _Transition(clock)
        self.error: str | None = None
        self._trim: TrimContextLike | None = None
        self._swap_in: SwapInContextLike | None = None
        self._slow_cleanup = False
        self._drop_file = False

    # --- queries ------------------------------------------------------------------------------
    def status(self, devices: int = 0) -> SwapStatus:
        metrics = SwapMetrics(resident_pages=self._hooks.resident_pages(),
                              page_size=self.page_size)
        if self.handler is not None:
            metrics = _metrics_of(self.handler.metrics(), metrics.resident_pages,
                                  self.page_size)
        transition = (SwapStateTransition() if self.state is SwapState.FAILED
                      else self.transition.snapshot())
        return SwapStatus(self.state, metrics, transition, devices, self.error,
                          frozen_seconds=round(self.frozen_seconds, 6))

    @property
    def work_pending(self) -> bool:
        """Whether :meth:`step` has a chunk to run."""
        return self.state.in_progress

    # --- commands -----------------------------------------------------------------------------
    def enable(self) -> SwapStatus:
        """Freeze the VMM tree, move resident guest memory to staging, thaw.

        Valid in every state: from Ready it starts vmm-swap; otherwise it aborts a running trim,
        swap-out or swap-in and moves whatever the guest made resident since (crosvm's
        ``handle_enable_command``). Raises CommandError(FAILED) if the move failed (state
        Failed) or could not start (state unchanged).
        """
        created = False
        self.prior_state, self.enable_phase = self.state, 1  # STARTING: nothing moved yet
        self._persist()
        if self.handler is None:
            try:
                self.handler = self._hooks.create_handler()
            except OSError as err:
                self._enable_over()
                raise CommandError(ErrorKind.FAILED,
                                   f"cannot set up the page handler: {err}") from err
            created = True
        handler = self.handler
        # Everything that can happen while the VMM runs happens before the freeze.
        # The monitor may offer ``serve_pending`` (serve waiting faults): then faults are served
        # between the preparation's steps instead of waiting for all of it.
        serve = getattr(self._hooks, "serve_pending", None)
        _call_optional(handler, "prepare_move", "preparing staging before the freeze",
                       **({"between": serve} if serve is not None else {}))
        move_started = False
        frozen_at: float | None = None
        asked = self._clock()
        try:
            with self._hooks.freeze():
                frozen_at = self._clock()
                if created:
                    self._hooks.register_all()
                registered = self._clock()
                # Only now, with every writer stopped, is the old work dropped: a failed freeze
                # must leave the state as it was.
                self._abort_background()
                self.transition.begin()
                self.state = SwapState.PENDING
                move_started = True
                self.enable_phase = 2  # MOVING: pages may leave guest memory from here on
                self._persist()
                try:
                    if tracks(handler):
                        # Clean pages leave without a copy; the scan also protects every
                        # page again, so what the guest writes from now on is seen.
                        handler.release_clean(self._hooks.scan_written())
                    self.transition.pages = handler.move_to_staging()
                except Exception as err:
                    # Any failure, not only OSError: pages may already sit in staging, so the
                    # handler must stay (state Failed; disable still brings them back).
                    self._fail(f"moving guest memory to staging failed: {err}")
                    raise CommandError(ErrorKind.FAILED, self.error or "") from err
                self.transition.end()
                self.error = None
                moved = self._clock()
            self._note_thawed(frozen_at)
            _log.info("enable: %d pages moved; VMM frozen %.3f s (stopping it took %.3f s, "
                      "registering %.3f s, moving %.3f s, thawing %.3f s)",
                      self.transition.pages, self.frozen_seconds, frozen_at - asked,
                      registered - frozen_at, moved - registered,
                      frozen_at + self.frozen_seconds - moved)
        except CommandError:
            self._note_thawed(frozen_at)
            self._enable_over()
            raise
        except Exception as err:
            self._note_thawed(frozen_at)
            if move_started:
                # The move finished but thawing failed: staged pages must not be discarded.
                self._fail(f"enable: thawing the VMM failed after the move: {err}")
                self._enable_over()
                raise CommandError(ErrorKind.FAILED, self.error or "") from err
            # Freezing or registering failed: nothing was moved.
            _call_optional(handler, "release_prepared", "freeing prepared staging")
            if created:
                self._discard_handler()
            self._enable_over()
            raise CommandError(ErrorKind.FAILED, f"enable failed: {err}") from err
        self._enable_over()
        return self.status()

    def _note_thawed(self, frozen_at: float | None) -> None:
        if frozen_at is not None:
            self.frozen_seconds = self._clock() - frozen_at

    def _enable_over(self) -> None:
        self.enable_phase = 0
        self._persist()

    def _persist(self) -> None:
        if self._journal is not None:
            self._journal(self)

    def trim(self) -> None:
        """Pending → TrimInProgress: drop staging pages that are zero or equal to the file."""
        if self.state is not SwapState.PENDING:
            raise CommandError(ErrorKind.STATE, _not_ready("trim", self.state,
                                                           "it needs state Pending"))
        assert self.handler is not None
        self._trim = self.handler.start_trim()
        self.transition.begin()
        self.state = SwapState.TRIM_IN_PROGRESS
        self._persist()

    def swap_out(self) -> None:
        """Pending → SwapOutInProgress: write staging to the swap file, in chunks."""
        if self.state is not SwapState.PENDING:
            raise CommandError(ErrorKind.STATE, _not_ready("out", self.state,
                                                           "it needs state Pending"))
        self.transition.begin()
        self.state = SwapState.SWAP_OUT_IN_PROGRESS
        self._persist()

    def disable(self, slow_file_cleanup: bool = False, drop_file: bool = False) -> None:
        """Any enabled state → SwapInInProgress: bring every page back, then Ready.

        With dirty tracking the swap file and the registrations are kept after the swap-in
        (the next enable releases unwritten pages without copying them), unless
        ``drop_file`` or ``slow_file_cleanup`` asks for the file to go; in Ready either drops
        a kept file.
        """
        if self.state is SwapState.READY:
            if self.handler is not None:
                if not (slow_file_cleanup or drop_file):
                    return  # the kept file stays
                self.drop_kept()
            self.slow_cleanup_asked = slow_file_cleanup
            self._persist()
            self._hooks.disabled(slow_file_cleanup)
            return
        self._drop_file = drop_file
        if self.state is SwapState.SWAP_IN_IN_PROGRESS:
            self._slow_cleanup = slow_file_cleanup
            self._persist()
            return
        self._start_swap_in(slow_file_cleanup)

    def drop_kept(self) -> None:
        """Ready with a kept swap file (dirty tracking): stop tracking, forget the file's
        copies (every page is in guest memory). The caller truncates the file."""
        if self.state is not SwapState.READY or self.handler is None:
            return
        try:
            self._hooks.unregister_all()
        finally:
            self._discard_handler()

    @property
    def registered(self) -> bool:
        """Whether guest memory is registered: swap enabled, or a kept file being tracked."""
        return self.state.enabled or self.handler is not None

    def _start_swap_in(self, slow_file_cleanup: bool) -> None:
        assert self.handler is not None
        self._abort_background()
        self._slow_cleanup = slow_file_cleanup
        self._swap_in = self.handler.start_swap_in()
        self.transition.begin()
        self.state = SwapState.SWAP_IN_IN_PROGRESS
        self._persist()

    # --- background work ----------------------------------------------------------------------
    def step(self) -> None:
        """Run one chunk of the current operation.

        MappingChangingError (and other uffd fill errors of the swap-in) propagate when the
        monitor must read the uffd's events before retrying; the state is unchanged then.
        """
        if self.state is SwapState.TRIM_IN_PROGRESS:
            self._step_trim()
        elif self.state is SwapState.SWAP_OUT_IN_PROGRESS:
            self._step_out()
        elif self.state is SwapState.SWAP_IN_IN_PROGRESS:
            self._step_swap_in()

    def _step_trim(self) -> None:
        assert self._trim is not None
        try:
            trimmed = self._trim.trim_pages(MAX_TRIM_PAGES)
        except OSError as err:
            # Trim only drops redundant copies; a failure loses nothing. Back to Pending.
            _log.error("trim failed: %s", err)
            self.error = f"trim failed: {err}"
            trimmed = None
        if trimmed is None:
            self._trim = None
            self.transition.end()
            self.state = SwapState.PENDING
            self._persist()
        else:
            self.transition.pages += trimmed

    def _step_out(self) -> None:
        assert self.handler is not None
        try:
            written = self.handler.swap_out(MAX_SWAP_CHUNK)
        except OSError as err:
            self._fail(f"swap out failed: {err}; every page is still in staging or the swap "
                       "file; disable brings them back")
            return
        if written == 0:
            self.transition.end()
            self.state = SwapState.ACTIVE
            self._persist()
        else:
            self.transition.pages += written

    def _step_swap_in(self) -> None:
        assert self.handler is not None and self._swap_in is not None
        try:
            pages = self._swap_in.swap_in(self._hooks.main_uffd(), MAX_SWAP_CHUNK)
        except (MappingChangingError, ProcessGoneError):
            raise
        except OSError as err:
            self._fail(f"swap in failed: {err}; the remaining pages stay in staging or the "
                       "swap file and faults are still served from there")
            return
        if pages:
            self.transition.pages += pages
            return
        self._finish_swap_in()

    def _finish_swap_in(self) -> None:
        assert self._swap_in is not None
        self._swap_in.close()
        self._swap_in = None
        self.transition.end()
        if (tracks(self.handler) and not self._slow_cleanup and not self._drop_file
                and self._hooks.may_keep()):
            self.state = SwapState.READY
            self.error = None
            self.slow_cleanup_asked = False
            self._persist()
            self._hooks.kept()
            return
        try:
            self._hooks.unregister_all()
        finally:
            self._discard_handler()
            self.state = SwapState.READY
            self.error = None
            self.slow_cleanup_asked = self._slow_cleanup
            self._persist()
            self._hooks.disabled(self._slow_cleanup)

    # --- helpers ------------------------------------------------------------------------------
    def _abort_background(self) -> None:
        """Stop trim / swap-out / swap-in where they are; every page stays valid."""
        self._trim = None
        if self._swap_in is not None:
            swap_in, self._swap_in = self._swap_in, None
            swap_in.close()

    def fail(self, message: str) -> None:
        """Enter Failed (every page stays where it is; ``disable`` brings them back)."""
        if self.handler is None:
            self.error = message
            return
        self._fail(message)

    def _fail(self, message: str) -> None:
        _log.error("%s", message)
        self._abort_background()
        self.error = message
        self.transition.reset()
        self.state = SwapState.FAILED
        self._persist()

    def _discard_handler(self) -> None:
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.close()

    # --- a successor taking over --------------------------------------------------------------
    def adopt(self, handler: PageHandlerLike | None, state: SwapState, *, pages: int = 0,
              error: str | None = None, slow_cleanup: bool = False) -> None:
        """Take over a dead monitor's state: ``handler`` was resumed over its page state.

        Work that was running goes on from where the page state says it is: a swap-out keeps
        writing what is left in staging; a trim or a swap-in starts a fresh pass (trim only
        drops redundant copies and swap-in only fills missing pages, so a pass over pages
        already done changes nothing).
        """
        self.handler = handler
        self.state = state
        self.error = error
        self.enable_phase = 0
        self._slow_cleanup = self.slow_cleanup_asked = slow_cleanup
        self.transition.begin()
        self.transition.pages = pages
        if state is SwapState.TRIM_IN_PROGRESS:
            assert handler is not None
            self._trim = handler.start_trim()
        elif state is SwapState.SWAP_IN_IN_PROGRESS:
            assert handler is not None
            self._swap_in = handler.start_swap_in()
        elif not state.in_progress:
            self.transition.end()
        self._persist()

    def pages_remaining(self) -> int:
        """Pages the handler still holds outside guest memory (staging + swap file)."""
        if self.handler is None:
            return 0
        m = _metrics_of(self.handler.metrics(), 0, self.page_size)
        return m.staging_pages + m.swap_pages


def _not_ready(command: str, state: SwapState, need: str) -> str:
    if state is SwapState.READY:
        return f"{command}: vmm-swap is disabled (state Ready); run enable first"
    return f"{command} is not possible in state {state}: {need}"


def _metrics_of(raw: Any, resident_pages: int, page_size: int) -> SwapMetrics:
    """Convert the page handler's metrics record (any object with the counter attributes)."""
    values = {f.name: int(getattr(raw, f.name, 0) or 0) for f in fields(SwapMetrics)}
    if not values["resident_pages"]:
        values["resident_pages"] = resident_pages
    if not values["page_size"]:
        values["page_size"] = page_size
    return SwapMetrics(**values)
