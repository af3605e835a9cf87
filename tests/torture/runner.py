"""The runner side: VMM processes fed with seeds, a hard timeout per scenario, a tiny tmpfs
for the disk-full scenarios, and the summary.

The runner never touches guest memory; a VMM process that does not answer in time (a fault
that is never served) is killed and its seed reported as a hang, which fails the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from vmmswap.vm.hugetlb_pool import HugetlbPool, ShmemThpMode

SCENARIO_TIMEOUT: Final = 90.0
ROOT: Final = Path(__file__).resolve().parents[2]
SMALL_TMPFS: Final = "1m"
#: A 24 MiB guest is 12 huge pages, its staging as many again, and some slack.
HUGE_PAGES_PER_JOB: Final = 32


@dataclass
class Summary:
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["ok"]]

    def total(self, key: str) -> int:
        return sum(int(r.get(key, 0)) for r in self.results)

    def line(self) -> str:
        kvm = sum(1 for r in self.results if r.get("kind") == "kvm")
        return (f"{len(self.results)} scenarios ({kvm} on KVM, {self.total('huge_backed')} of "
                f"them on huge pages), {len(self.failures)} failed, "
                f"{self.seconds:.1f} s; commands {self.total('commands')}, refused "
                f"{self.total('refused')}, disk-full failures {self.total('disk_full_failures')}, "
                f"torn writes {self.total('eio_failures')} in {self.total('eio_scenarios')} "
                f"scenarios"
                f", monitor kills {self.total('monitor_kills')} + crash points armed in "
                f"{self.total('crash_armed')} scenarios -> restarts {self.total('restarts')} "
                f"(enables interrupted {self.total('enables_interrupted')})"
                f", dirty tracking in {self.total('tracking')} scenarios (pages released "
                f"without a copy {self.total('released_pages')}, files dropped "
                f"{self.total('files_dropped')})"
                f", parks read and called off {self.total('parks')} (refused "
                f"{self.total('parks_refused')})"
                f", devices forked {self.total('devices_forked')} / killed "
                f"{self.total('devices_killed')} (while faulting "
                f"{self.total('killed_while_faulting')}), worker ops {self.total('worker_ops')}"
                f", pages checked {self.total('pages_checked')}; KVM guests: writes "
                f"{self.total('guest_writes')}, verifies {self.total('guest_verifies')}, "
                f"balloons {self.total('guest_balloons')}, pages checked "
                f"{self.total('guest_pages_checked')}")


def _thread_state(pid: int, tid: int) -> str:
    """A thread's state letter, wait channel and the top of its kernel stack (root only)."""
    base = f"/proc/{pid}/task/{tid}"
    state = chan = ""
    with contextlib.suppress(OSError, IndexError), open(f"{base}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    with contextlib.suppress(OSError), open(f"{base}/wchan") as f:
        chan = f.read().strip()
    stack = ""
    with contextlib.suppress(OSError), open(f"{base}/stack") as f:
        frames = [line.split()[-1].split("+")[0] for line in f.read().splitlines()[:4]]
        stack = "<".join(frames)
    return f"{state}:{chan or '-'}" + (f"[{stack}]" if stack else "")


@contextlib.contextmanager
def small_tmpfs() -> Iterator[str | None]:
    """A 1 MiB tmpfs (the full disk), or None where mounting is not allowed."""
    path = tempfile.mkdtemp(prefix="vmmswap-torture-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_TMPFS},mode=0700",
                              "tmpfs", path], capture_output=True, check=False).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            os.rmdir(path)


@contextlib.contextmanager
def huge_pages(jobs: int) -> Iterator[bool]:
    """Hugetlb pages for ``jobs`` KVM scenarios at once (guest and staging) and shmem THP
    on ``advise``, both restored afterwards; False where they cannot be had (not root).
    ``jobs`` 0 (host scenarios only, which never use them) leaves both machine-wide settings
    alone: two runs that overlap restore them in the wrong order (the second one started
    from the first one's ``advise`` and puts it back last)."""
    if jobs == 0:
        yield False
        return
    try:
        pool = HugetlbPool(HUGE_PAGES_PER_JOB * jobs)
    except OSError:
        yield False
        return
    try:
        thp = ShmemThpMode("advise")
    except OSError:
        pool.close()
        yield False
        return
    try:
        yield True
    finally:
        thp.close()
        pool.close()


class VmmProcess:
    def __init__(self, swap_dir: str, small: str | None, huge: bool = False) -> None:
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.torture.vmm", swap_dir, small or "",
             "huge" if huge else ""], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self._readline(60.0)

    def _readline(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline() or None

    def run(self, seed: int, corrupt: bool, kind: str = "host",
            skip_written: bool = False, park_memfds: bool = False) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"seed": seed, "corrupt": corrupt, "kind": kind,
                                              "skip_written": skip_written,
                                              "park_memfds": park_memfds}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"seed": seed, "ok": False, "error": f"SEED {seed}: the VMM process died"}
        line = self._readline(SCENARIO_TIMEOUT)
        if line is None:
            where = self.describe_hang()
            self.kill()
            return {"seed": seed, "ok": False,
                    "error": f"SEED {seed}: no answer in {SCENARIO_TIMEOUT} s (hang); "
                             f"{where}"}
        result: dict[str, Any] = json.loads(line)
        return result

    def describe_hang(self) -> str:
        """Where a hung scenario's threads wait (the VMM's and its children's wait channels),
        and its Python stacks on stderr (SIGUSR1: faulthandler), for the report."""
        parts = []
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                        if int(fields[1]) == self.proc.pid:
                            pids.append(int(entry))
        for pid in pids:
            chans = []
            with contextlib.suppress(OSError):
                for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
                    chans.append(_thread_state(pid, int(tid)))
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
                parts.append(f"{f.read().strip()}[{pid}]: {', '.join(chans)}")
        for pid in pids:  # the VMM and its monitors print their Python stacks (faulthandler)
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
                if pid != self.proc.pid and f.read().strip() != "swap monitor":
                    continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(2.0)
        return "threads waiting in: " + "; ".join(parts) + " (Python stacks on stderr)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def run_seeds(seeds: range, jobs: int = 2, corrupt: bool = False, swap_dir: str | None = None,
              progress: bool = False, kvm_seeds: range = range(0),
              skip_written: bool = False, park_memfds: bool = False) -> Summary:
    """Run every seed of ``seeds`` (host scenarios) and of ``kvm_seeds`` (the micro-VM
    variant) on ``jobs`` VMM processes; the summary in (kind, seed) order."""
    summary = Summary()
    start = time.monotonic()
    todo: queue.Queue[tuple[str, int]] = queue.Queue()
    for seed in kvm_seeds:  # the longer ones first
        todo.put(("kvm", seed))
    for seed in seeds:
        todo.put(("host", seed))
    lock = threading.Lock()
    with small_tmpfs() as small, tempfile.TemporaryDirectory(prefix="vmmswap-torture-",
                                                             dir=swap_dir) as big, \
            huge_pages(jobs if kvm_seeds else 0) as huge:
        def job() -> None:
            vmm = VmmProcess(big, small, huge)
            try:
                while True:
                    try:
                        kind, seed = todo.get_nowait()
                    except queue.Empty:
                        return
                    if not vmm.alive():
                        vmm = VmmProcess(big, small, huge)
                    result = vmm.run(seed, corrupt, kind, skip_written, park_memfds)
                    result.setdefault("kind", kind)
                    with lock:
                        summary.results.append(result)
                        if progress and not result["ok"]:
                            print(result["error"], file=sys.stderr, flush=True)
                        if progress and len(summary.results) % 100 == 0:
                            print(f"... {len(summary.results)} done, "
                                  f"{len(summary.failures)} failed", file=sys.stderr, flush=True)
            finally:
                vmm.close()

        threads = [threading.Thread(target=job) for _ in range(max(1, jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    summary.results.sort(key=lambda r: (str(r["kind"]), int(r["seed"])))
    summary.seconds = time.monotonic() - start
    return summary
