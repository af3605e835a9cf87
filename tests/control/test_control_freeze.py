"""Freezing a real process tree: every thread of every descendant stops, and all resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from vmmswap.control import freeze
from vmmswap.control.freeze import FreezeError, freeze_tree, process_tree, thread_states
from vmmswap.control.thaw_guard import ThawGuard

# A parent with a spinning thread and two spinning children, one of which forks a grandchild.
TREE = textwrap.dedent("""
    import os, sys, threading, time
    def spin():
        while True:
            pass
    threading.Thread(target=spin, daemon=True).start()
    kids = []
    for depth in range(2):
        pid = os.fork()
        if pid == 0:
            if depth == 1 and os.fork() == 0:
                spin()
            spin()
        kids.append(pid)
    print("ok", flush=True)
    spin()
""")

FORKER = textwrap.dedent("""
    import os, sys, time
    print("ok", flush=True)
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(0.05)
            os._exit(0)
        time.sleep(0.003)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
""")


def _spawn(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ok"
    return proc


@pytest.fixture
def tree() -> Iterator[subprocess.Popen[str]]:
    proc = _spawn(TREE)
    deadline = time.monotonic() + 10
    while len(process_tree(proc.pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # the grandchild is forked after "ok"
    yield proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _all_states(pids: list[int]) -> set[str]:
    return {s for p in pids for s in thread_states(p).values()}


@pytest.mark.timeout(60)
def test_freeze_stops_every_thread_and_thaw_resumes(tree: subprocess.Popen[str]) -> None:
    pids = process_tree(tree.pid)
    assert len(pids) == 4
    with freeze_tree(tree.pid) as frozen:
        assert sorted(frozen.pids) == pids
        assert _all_states(pids) <= {"T"}
    deadline = time.monotonic() + 5
    while "T" in _all_states(pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "T" not in _all_states(pids)


@pytest.mark.timeout(60)
def test_excluded_subtree_keeps_running(tree: subprocess.Popen[str]) -> None:
    children = [p for p in process_tree(tree.pid) if p != tree.pid]
    spared = max(children, key=lambda p: len(process_tree(p)))  # the one with a grandchild
    with freeze_tree(tree.pid, exclude=[spared]) as frozen:
        assert spared not in frozen.pids
        assert not set(process_tree(spared)) & set(frozen.pids)
        assert "T" not in _all_states(process_tree(spared))


@pytest.mark.timeout(60)
def test_forks_during_freeze_are_caught() -> None:
    proc = _spawn(FORKER)
    try:
        for _ in range(5):
            with freeze_tree(proc.pid) as frozen:
                now = process_tree(proc.pid)
                assert set(now) <= set(frozen.pids)
                assert _all_states(now) <= {"T", "Z", "X"}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_missing_process_is_an_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(FreezeError, match="does not exist"):
        freeze_tree(proc.pid)


@pytest.mark.timeout(60)
def test_timeout_thaws_what_was_stopped(tree: subprocess.Popen[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(freeze, "_stopped", lambda state: False)
    with pytest.raises(FreezeError, match="did not stop"):
        freeze_tree(tree.pid, timeout=0.2)
    monkeypatch.undo()
    time.sleep(0.2)
    assert "T" not in _all_states(process_tree(tree.pid))


def _state(pid: int) -> set[str]:
    return set(thread_states(pid).values())


def _wait_state(pid: int, stopped: bool, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (_state(pid) == {"T"}) != stopped:
        assert time.monotonic() < deadline, f"pid {pid} states {_state(pid)}, stopped={stopped}"
        time.sleep(0.01)


@pytest.fixture
def sleeper_and_guard() -> Iterator[tuple[int, ThawGuard]]:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    guard = ThawGuard.start()
    assert guard is not None
    try:
        yield sleeper.pid, guard
    finally:
        guard.close()
        sleeper.kill()
        sleeper.wait()


@pytest.mark.timeout(60)
def test_thaw_guard_resumes_what_a_dead_monitor_left_stopped(
        sleeper_and_guard: tuple[int, ThawGuard]) -> None:
    pid, guard = sleeper_and_guard
    with freeze_tree(pid, witness=guard):
        _wait_state(pid, stopped=True)
        # The monitor "dies": its end of the pipe closes without a thaw.
        guard._pipe.close()  # type: ignore[union-attr]
        guard._pipe = None
        _wait_state(pid, stopped=False)


@pytest.mark.timeout(60)
def test_thaw_guard_forgets_a_thawed_tree(sleeper_and_guard: tuple[int, ThawGuard]) -> None:
    pid, guard = sleeper_and_guard
    with freeze_tree(pid, witness=guard):
        _wait_state(pid, stopped=True)
    _wait_state(pid, stopped=False)
    os.kill(pid, signal.SIGSTOP)  # stopped by someone else, later
    _wait_state(pid, stopped=True)
    guard.close()  # EOF after a thaw: nothing to resume
    time.sleep(0.2)
    assert _state(pid) == {"T"}
