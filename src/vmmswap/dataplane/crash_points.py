"""Named points between the steps of every state change, where a crash test kills the monitor.

Each ordering rule of DESIGN.md ("Crash consistency") is a sequence of stores to the page
state; :func:`crash_point` sits between two of them. In production it does nothing (one
call to an empty function). A crash test's child process -- and only that: nothing here reads
the environment or loads code by name -- installs a hook with :func:`set_hook` that SIGKILLs the
process at the N-th point it passes, so a successor meets the state exactly as that step left it.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["crash_point", "set_hook"]

_hook: Callable[[str], None] | None = None


def crash_point(name: str) -> None:
    """Between two steps of a state change (``name``: ``"<operation>.<step done>"``)."""
    if _hook is not None:
        _hook(name)


def set_hook(hook: Callable[[str], None] | None) -> None:
    """Install (or remove, with None) the function every crash point calls: tests only."""
    global _hook
    _hook = hook
