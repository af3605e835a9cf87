"""Freezing a process tree with SIGSTOP, and thawing it.

Why: while guest pages are copied to staging and dropped from the memfds, nothing may write guest
memory. A write between the copy and the MADV_REMOVE is lost (crosvm commit aa49f2918 fixed a
virtio-blk thread doing exactly that). So every process that maps guest memory -- the VMM and its
descendants -- is stopped, and the move waits until *every thread* reports state ``T``: SIGSTOP is
asynchronous, and a thread still running in user space can still write.

The tree is re-read after the stop; when a fork raced with the freeze, the new processes are
stopped too, up to :data:`FREEZE_ROUNDS` times (crosvm's policy), then the freeze fails.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Collection
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

_log = logging.getLogger(__name__)

FREEZE_ROUNDS: Final = 3
#: How long one round waits for every thread to stop. crosvm polls each task 10 x 50 ms.
STOP_TIMEOUT: Final = 5.0
_POLL: Final = 0.002


class FreezeError(OSError):
    """The tree could not be frozen; it has been thawed again."""


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children_via_proc_children(pid: int) -> list[int] | None:
    """Children of every thread of ``pid`` (children files are per task, not per process)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    children: list[int] = []
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text is None:
            if not Path(f"/proc/{pid}/task/{tid}").exists():
                continue  # the thread exited meanwhile
            return None  # CONFIG_PROC_CHILDREN is off
        children.extend(int(c) for c in text.split())
    return children


def _ppid_table() -> dict[int, list[int]]:
    """parent → children for every process, from /proc/*/stat (fallback, O(all processes))."""
    table: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat is None:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        table.setdefault(int(fields[1]), []).append(int(entry))
    return table


def process_tree(roots: int | Collection[int], exclude: Collection[int] = ()) -> list[int]:
    """``roots`` and all their live descendants, minus ``exclude`` and *their* descendants."""
    excluded = set(exclude)
    table: dict[int, list[int]] | None = None
    result: list[int] = []
    stack = [roots] if isinstance(roots, int) else list(roots)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid in excluded:
            continue
        seen.add(pid)
        if not Path(f"/proc/{pid}").exists():
            continue
        result.append(pid)
        children = None if table is not None else _children_via_proc_children(pid)
        if children is None:
            if table is None:
                table = _ppid_table()
            children = table.get(pid, [])
        stack.extend(children)
    return sorted(result)


def thread_states(pid: int) -> dict[int, str]:
    """tid → the one-letter state of each thread of ``pid`` ({} if the process is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return {}
    states: dict[int, str] = {}
    for tid in tids:
        stat = _read(f"/proc/{pid}/task/{tid}/stat")
        if stat is not None:
            states[int(tid)] = stat[stat.rfind(")") + 2]
    return states


def _waits(pids: Collection[int]) -> dict[int, str]:
    """tid → the kernel function a thread not stopped sleeps in (wchan), for the error."""
    out: dict[int, str] = {}
    for pid in pids:
        for tid, state in thread_states(pid).items():
            if not _stopped(state):
                comm = (_read(f"/proc/{pid}/task/{tid}/comm") or "?").strip()
                ppid = (_read(f"/proc/{pid}/stat") or ") ? ? ?").rsplit(")", 1)[1].split()[1]
                out[tid] = (f"{comm} (ppid {ppid}): "
                            f"{_read(f'/proc/{pid}/task/{tid}/wchan') or '?'}")
    return out


def _stopped(state: str) -> bool:
    # T: stopped by a signal; t: ptrace stop (also not running); Z/X: exiting, writes nothing.
    return state in "TtZX"


def _kill(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


class FreezeWitness(Protocol):
    """Someone outside this process who resumes the tree if this process dies while it is
    frozen (:class:`vmmswap.control.thaw_guard.ThawGuard`)."""

    def will_stop(self, pid: int) -> None: ...

    def thawed(self) -> None: ...


class FrozenTree:
    """A stopped process tree; :meth:`thaw` (or leaving the ``with`` block) resumes it."""

    def __init__(self, pids: list[int], witness: FreezeWitness | None = None) -> None:
        self.pids = pids
        self._witness = witness
        self._thawed = False

    def thaw(self) -> None:
        """SIGCONT every frozen process. Idempotent; never raises for processes gone meanwhile."""
        if self._thawed:
            return
        self._thawed = True
        for pid in self.pids:
            _kill(pid, signal.SIGCONT)
        if self._witness is not None:
            self._witness.thawed()

    def __enter__(self) -> FrozenTree:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.thaw()


def freeze_tree(roots: int | Collection[int], exclude: Collection[int] = (), *,
                timeout: float = STOP_TIMEOUT, rounds: int = FREEZE_ROUNDS,
                while_waiting: Callable[[], object] | None = None,
                witness: FreezeWitness | None = None) -> FrozenTree:
    """Stop ``roots`` and their descendants (except ``exclude`` and theirs); wait until every
    thread is stopped.

    ``while_waiting`` runs between polls: the monitor serves page faults there, since a thread
    blocked in a userfaultfd fault may need its fault served before it can take the signal.
    On any failure every process stopped so far gets SIGCONT before FreezeError is raised.
    ``witness`` learns each pid before it is stopped, and when the tree is thawed.
    """
    frozen = FrozenTree([], witness)
    try:
        for _ in range(rounds):
            pids = process_tree(roots, exclude)
            if not pids:
                raise FreezeError(errno.ESRCH, f"process {roots} does not exist")
            new = [p for p in pids if p not in frozen.pids]
            for pid in new:
                if witness is not None:
                    witness.will_stop(pid)
                if _kill(pid, signal.SIGSTOP):
                    frozen.pids.append(pid)
            _wait_stopped(frozen.pids, timeout, while_waiting)
            if set(process_tree(roots, exclude)) <= set(frozen.pids):
                return frozen
            _log.info("processes forked while freezing %s; stopping them too", roots)
        raise FreezeError(errno.EAGAIN, f"new processes forked while freezing the tree of {roots} "
                          f"({rounds} rounds)")
    except BaseException:
        frozen.thaw()
        raise


def _wait_stopped(pids: list[int], timeout: float,
                  while_waiting: Callable[[], object] | None) -> None:
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending:
        pending = [p for p in pending
                   if any(not _stopped(s) for s in thread_states(p).values())]
        if not pending:
            return
        if time.monotonic() > deadline:
            running = {p: "".join(sorted(set(thread_states(p).values()))) for p in pending}
            raise FreezeError(errno.ETIME, f"threads did not stop within {timeout} s: "
                              f"pid → thread states {running}; waiting in "
                              f"{_waits(pending)}")
        if while_waiting is not None:
            while_waiting()
        time.sleep(_POLL)
