"""Driving the test VMM (control_vmm.py) from pytest, with timeouts everywhere."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmmswap.uffd.pagesize import PAGE_SIZE

HERE = Path(__file__).resolve().parent
SRC = HERE.parent.parent / "src"
FAKE_FACTORY = "control_fake_handler:factory"
MIB = 1024 * 1024
#: The test VMM's regions (control_vmm.LAYOUT).
REGION_SIZES = (4 * MIB, 2 * MIB)


class VmmTimeoutError(TimeoutError):
    pass


class TestVmm:
    """The test VMM child process. ``call`` sends one command and waits for its answer."""

    __test__ = False

    def __init__(self, env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(SRC), str(HERE), full_env.get("PYTHONPATH", "")])
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "control_vmm.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=full_env, text=True, bufsize=1)
        hello = self._readline(30)
        self.pid = int(hello["pid"])
        self.monitor_pid = 0

    def _readline(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise VmmTimeoutError(f"the test VMM did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"the test VMM exited (code {self.proc.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def call(self, op: str, timeout: float = 60, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._readline(timeout)

    def ok(self, op: str, timeout: float = 60, **kwargs: Any) -> dict[str, Any]:
        result = self.call(op, timeout, **kwargs)
        assert result["ok"], f"{op} failed: {result}"
        return result

    def launch(self, swap_dir: str | Path, control_socket: str | Path | None = None,
               **kwargs: Any) -> int:
        result = self.ok("launch", swap_dir=str(swap_dir),
                         control_socket=None if control_socket is None else str(control_socket),
                         **kwargs)
        self.monitor_pid = int(result["monitor_pid"])
        return self.monitor_pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        """Stop the VMM; kill it (and a leftover monitor) if it does not go quietly."""
        if self.proc.poll() is None:
            try:
                if self.monitor_pid:
                    self.call("close", timeout=60)
            except (VmmTimeoutError, EOFError, OSError):
                pass
            self.kill()
        if self.monitor_pid:
            wait_gone(self.monitor_pid, 10, kill=True)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in "ZX"


def wait_gone(pid: int, timeout: float, kill: bool = False) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return not pid_alive(pid)


class Model:
    """What each guest page should hold (a pattern seed per page); drives writes and checks."""

    def __init__(self, vmm: TestVmm) -> None:
        self.vmm = vmm
        self.seeds = [[0] * (size // PAGE_SIZE) for size in REGION_SIZES]

    def write(self, region: int, offset: int, length: int, seed: int) -> None:
        self.vmm.ok("write", region=region, offset=offset, length=length, seed=seed)
        first = offset // PAGE_SIZE
        for page in range(first, first + length // PAGE_SIZE):
            self.seeds[region][page] = seed

    def written_pages(self) -> int:
        return sum(1 for region in self.seeds for s in region if s)

    def verify(self) -> None:
        """Every page of both regions holds what was last written (zeros where nothing was)."""
        for region, seeds in enumerate(self.seeds):
            start = 0
            for page in range(1, len(seeds) + 1):
                if page == len(seeds) or seeds[page] != seeds[start]:
                    got = self.vmm.ok("verify", region=region, offset=start * PAGE_SIZE,
                                      length=(page - start) * PAGE_SIZE, seed=seeds[start])
                    assert got["mismatched_pages"] == 0, (
                        f"region {region} pages {start}..{page} (seed {seeds[start]}): {got}")
                    start = page
