"""Review (regression): ``StateMachine.enable`` when the move raises something other than OSError.

Found in review: enable set state Pending, then handled only OSError from
``handler.move_to_staging()``. Anything else (RuntimeError "can't start new thread",
MemoryError, a bug) reached the outer ``except Exception`` -- written for "freezing or
registering failed: nothing was moved" -- which, on a first enable, *closed the handler*
(staging memfd and swap file, with the pages already moved in them) while the state stayed
Pending and every uffd stayed registered. With ``handler`` None the monitor answers every later
fault with a zero page (``UffdSet._answer_while_disabled``): silent data loss. Fixed in the
working tree during the review; this test keeps it fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from vmmswap.control.monitor_state import CommandError, StateMachine

pytestmark = pytest.mark.timeout(30)


class _Handler:
    """Moves some pages, then fails with a non-OSError (as move.move_to_staging can)."""

    def __init__(self) -> None:
        self.staging = 0
        self.closed = False

    def move_to_staging(self) -> int:
        self.staging = 5  # batches that finished before the failure are staged
        raise RuntimeError("can't start new thread")

    def handle_page_fault(self, uffd: Any, addr: int, write: bool = False) -> None:
        pass

    def handle_remove(self, start: int, end: int) -> None:
        pass

    def metrics(self) -> Any:
        return None

    def close(self) -> None:
        self.closed = True


class _Hooks:
    def __init__(self) -> None:
        self.handler = _Handler()
        self.registered = False

    def create_handler(self) -> _Handler:
        return self.handler

    @contextlib.contextmanager
    def _freeze(self) -> Iterator[None]:
        yield

    def freeze(self) -> contextlib.AbstractContextManager[None]:
        return self._freeze()

    def register_all(self) -> None:
        self.registered = True

    def unregister_all(self) -> None:
        self.registered = False

    def main_uffd(self) -> object:
        return object()

    def resident_pages(self) -> int:
        return 0

    def disabled(self, slow_file_cleanup: bool) -> None:
        pass


def test_non_oserror_during_move_keeps_staged_pages() -> None:
    hooks = _Hooks()
    machine = StateMachine(hooks)  # type: ignore[arg-type]
    with pytest.raises(CommandError):
        machine.enable()
    # Pages were moved: the handler that holds them must survive, and faults must keep being
    # served from it (a None handler means "answer every fault with zeros").
    assert not hooks.handler.closed
    assert (machine.handler is not None) and id(machine.handler) == id(hooks.handler)
    assert hooks.registered
