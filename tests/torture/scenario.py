"""One torture scenario, run inside the VMM process: guest memory, a real monitor launched
through ``SwapController``, worker threads, device processes, and the host's random commands.

The host's decisions (commands, waits, device births and deaths, failures) all come from
``random.Random(seed)``, so a seed replays the same script; the interleaving with the workers
is the machine's, which is the point. Expectations the host checks on every command:

* trim / out are accepted exactly in Pending (or in a trim that just finished); in any other
  state they are refused with SwapStateError and the state does not change (in-progress work
  may only move on to its own end);
* enable and disable are accepted in every state; only a swap-out onto the full disk may fail;
* at the end, disable brings everything back: every page of every actor verifies.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmmswap.control.controller import SwapController
from vmmswap.control.status import SwapState
from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE

from .actors import Actor, Failure, Worker, device_main
from .commands import TIMEOUT, HostCommands, S
from .model import LAYOUT, SHARED, UNKNOWN, Ownership, check, content


@dataclass
class Options:
    """What a scenario may do; ``small_swap_dir`` is a tiny tmpfs (disk full), or None."""

    swap_dir: str
    small_swap_dir: str | None = None
    corrupt: bool = False  # negative control: a worker drops a page behind the model's back
    #: Negative control of dirty tracking: the scan at the second enable loses a written page.
    skip_written: bool = False
    #: Negative control of the park check: the park reads the guest memfds only (what a park
    #: knowing nothing of staging would store), right after an enable moved every page.
    park_memfds: bool = False
    huge_pages: bool = False  # the runner reserved hugetlb pages and turned shmem THP on


@dataclass
class Device:
    slot: int
    pid: int
    result_fd: int
    started_in: SwapState
    restarts: int = 0  # the controller's restarts when it was forked


def _uffd_view() -> str:
    """This process's userfaultfds (fdinfo: pending/total faults) and its registered VMAs."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "userfaultfd" in os.readlink(f"/proc/self/fd/{fd}"):
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    info = " ".join(f.read().split())
                fds.append(f"fd {fd}: {info}")
    vmas, head = [], ""
    with open("/proc/self/smaps") as f:
        for line in f:
            if not line[0].isupper() or ":" not in line.split()[0]:
                head = line.split()[0]
            elif line.startswith("VmFlags:") and " um" in line:
                vmas.append(head)
    return f"uffds [{'; '.join(fds)}], VMAs registered (um) {vmas}"


class Scenario(HostCommands):
    def __init__(self, seed: int, options: Options) -> None:
        self.seed = seed
        self.options = options
        self.rng = random.Random(seed)
        rng = self.rng
        self.workers_n = rng.choice((2, 2, 3))
        self.slots = rng.choice((1, 2))
        self.disk_full = options.small_swap_dir is not None and rng.random() < 0.15
        self.own = Ownership(rng, self.workers_n, self.slots)
        #: The N-th swap-file write tears (half written, then EIO) in the monitor, or 0.
        self.eio_at = rng.randint(1, 3) if not self.disk_full and rng.random() < 0.15 else 0
        #: Every fault waits this long in the monitor (ms): devices can be killed mid-fault.
        self.fault_delay_ms = rng.choice((1, 3)) if rng.random() < 0.2 else 0
        #: SIGKILLs of the monitor the host may send (at a random instant around a command),
        #: and the data-plane crash point at which the monitor kills itself (0: none).
        self.monitor_kills = rng.choice((1, 1, 2, 2, 3))
        self.crash_at = rng.randint(1, 400) if rng.random() < 0.5 else 0
        # For narrowing a failure down: VMMSWAP_TORTURE_KILLS=host|crash|none (default both).
        kills = os.environ.get("VMMSWAP_TORTURE_KILLS", "both")
        if kills not in ("both", "crash"):
            self.crash_at = 0
        if kills not in ("both", "host"):
            self.monitor_kills = 0
        if options.skip_written or options.park_memfds:
            # Scripted: a restart or a failed out would forget the clean pages, or move them.
            self.crash_at = self.eio_at = 0
            self.disk_full = False
        self.versions = self.own.initial.copy()
        super().__init__()
        self.devices: dict[int, Device] = {}
        self.memory: GuestMemory | None = None
        self.ctl: SwapController | None = None
        self.workers: list[Worker] = []

    # --- the run --------------------------------------------------------------------------------
    def _result(self, error: str | None) -> dict[str, Any]:
        return {"seed": self.seed, "ok": error is None, "error": error, **self.stats.__dict__}

    def _run(self) -> None:
        memory = self.memory = GuestMemory.create(list(LAYOUT), name="torture")
        shared = (self.own.owner == SHARED) & (self.versions != 0)
        for i in np.flatnonzero(shared):  # written before launch, never again
            memory.write(self.gaddr(int(i)), content(self.own.gpages[i:i + 1],
                                                     self.versions[i:i + 1]).tobytes())
        readahead = self.rng.random() < 0.8
        inject = {}
        if self.fault_delay_ms:
            self.note(f"every fault waits {self.fault_delay_ms} ms in the monitor")
            inject["INJECT_FAULT_DELAY_MS"] = str(self.fault_delay_ms)
        if self.crash_at:
            self.token = os.path.join(self.options.swap_dir, f"crash-{os.getpid()}-{self.seed}")
            with open(self.token, "w"):
                pass
            self.note(f"the monitor kills itself at crash point {self.crash_at}")
            self.stats.crash_armed = 1
            inject.update(INJECT_CRASH_AT=str(self.crash_at), INJECT_CRASH_TOKEN=self.token)
        self.launch(memory, readahead, inject)
        corrupt_worker = self.rng.randrange(self.workers_n) if self.options.corrupt else -1
        for w in range(self.workers_n):
            worker = Worker(f"seed {self.seed} worker {w}", w, memory, self.own, self.versions,
                            random.Random(self.seed * 1009 + w),
                            corrupt_at=self.rng.randint(3, 40) if w == corrupt_worker else None)
            self.workers.append(worker)
            worker.thread.start()
        if self.options.skip_written:
            self._two_cycles()
        elif self.options.park_memfds:
            self.controller().enable()   # every shared page written before launch -> staging
            self.do_park()
        else:
            for _ in range(self.rng.randint(6, 14)):
                self.check_workers()
                self.reap_devices()
                self.host_step()
        self.finish()

    def _two_cycles(self) -> None:
        """The negative control's script: a cycle, the workers write, they stop, an enable
        (whose scan loses one written page), a disable; the final check must see the stale
        page."""
        ctl = self.controller()
        ctl.enable()
        ctl.swap_out(wait=True, timeout=TIMEOUT)
        ctl.disable(wait=True, timeout=TIMEOUT)
        time.sleep(0.2)
        for worker in self.workers:
            worker.stop.set()
        for worker in self.workers:
            worker.thread.join(TIMEOUT)
        self.check_workers()
        ctl.enable()
        self.note(f"second enable: {ctl.status().dirty_tracking}")

    def host_step(self) -> None:
        rng = self.rng
        kills = 6 if self.stats.monitor_kills < self.monitor_kills else 0
        action = rng.choices(("host", "fork", "kill", "kill_monitor"), (18, 2, 2, kills))[0]
        if action == "host":
            self.host_command()
        else:
            getattr(self, f"do_{action}")()

    def do_kill_monitor(self) -> None:
        """SIGKILL the monitor at a random instant around the next command (from a timer
        thread: during an enable that thread is frozen with the VMM, so the kill lands where
        the thaw lets it); every page must survive it."""
        delay = self.rng.choice((0.0, 0.001, 0.005, 0.02, 0.06))
        ctl = self.controller()

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(ctl.monitor_pid, signal.SIGKILL)

        self.stats.monitor_kills += 1
        self.note(f"kill the monitor in {delay * 1000:.0f} ms")
        timer = threading.Timer(delay, kill)
        timer.start()
        self.host_command()
        timer.join()
        if self.crash_at and self.rng.random() < 0.3:  # arm the crash point again
            with open(self.token, "w"):
                pass

    def finish(self) -> None:
        """Devices finish, disable brings everything back, every page verifies."""
        for dev in list(self.devices.values()):
            self.wait_device(dev, TIMEOUT)
        ctl = self.controller()
        status = ctl.disable(slow_file_cleanup=self.rng.random() < 0.5, wait=True,
                             timeout=TIMEOUT)
        self.note(f"final disable -> {status.state}")
        for worker in self.workers:
            worker.stop.set()
        for worker in self.workers:
            worker.thread.join(TIMEOUT)
            if worker.thread.is_alive():
                raise Failure(f"{worker.name} is stuck (blocked on a fault?) after disable; "
                              f"{self.diagnose(worker)}")
        self.check_workers()
        self.verify_all("after the final disable")
        if ctl.status().state is not S.READY:
            raise Failure(f"not Ready after the final disable: {ctl.status()}")

    PARK_CHECK = True

    def check_parked(self, data: bytes) -> None:
        """The shared pages (written before launch, never again) in a park's memory file."""
        base = at = 0
        for _g, size in LAYOUT:
            n = size // PAGE_SIZE
            sl = slice(base, base + n)
            mask = (self.own.owner[sl] == SHARED) & (self.versions[sl] != UNKNOWN)
            bad = check(data[at:at + size], self.own.gpages[sl], self.versions[sl], mask)
            if bad is not None:
                raise Failure(f"host, a park's memory file: {bad.describe()}")
            self.stats.pages_checked += int(mask.sum())
            base += n
            at += size

    def verify_all(self, when: str) -> None:
        memory = self.memory
        assert memory is not None
        base = 0
        for g, size in LAYOUT:
            n = size // PAGE_SIZE
            sl = slice(base, base + n)
            versions = self.versions[sl]
            bad = check(memory.read(g, size), self.own.gpages[sl], versions,
                        versions != UNKNOWN)
            if bad is not None:
                raise Failure(f"host, {when}: {bad.describe()} (owner "
                              f"{int(self.own.owner[self.own.index_of(bad.gpage * PAGE_SIZE)])})")
            self.stats.pages_checked += n
            base += n

    def _teardown(self, error: str | None) -> str | None:
        if self.ctl is not None:
            self.stats.restarts = self.ctl.restarts
            with contextlib.suppress(Exception):
                self.stats.released_pages = \
                    self.ctl.status().dirty_tracking.released_total_pages
        if self.crash_at:
            with contextlib.suppress(OSError):
                os.unlink(self.token)
        for worker in self.workers:
            worker.stop.set()
        for worker in self.workers:
            worker.thread.join(TIMEOUT)
            if worker.error and error is None:
                error = worker.error
            self.stats.worker_ops += worker.ops
            self.stats.pages_checked += worker.pages_checked
        for dev in list(self.devices.values()):
            self.kill_device(dev)
        stuck = any(w.thread.is_alive() for w in self.workers)
        if self.ctl is not None and not stuck:
            try:
                self.ctl.close()
            except Exception as err:
                error = error or f"close: {type(err).__name__}: {err}"
        if error is not None:
            error = (f"SEED {self.seed}: {error}\nhost log: " + " | ".join(self.log[-15:]))
        if stuck:
            error = (error or "") + "\nSTUCK: a worker is blocked; the VMM process must go"
        elif self.memory is not None:
            self.memory.close()
        return error

    # --- helpers --------------------------------------------------------------------------------
    def diagnose(self, worker: Worker) -> str:
        """Where a stuck worker waits (its kernel stack) and what the monitor says."""
        tid = worker.thread.native_id
        try:
            with open(f"/proc/self/task/{tid}/stack") as f:
                stack = " < ".join(line.split()[-1] for line in f.read().splitlines()[:6])
        except OSError as err:
            stack = f"(no stack: {err})"
        try:
            status = self.controller().status()
            said = f"monitor: state {status.state}, error {status.error!r}"
        except Exception as err:
            said = f"monitor: no status ({err})"
        return f"kernel stack {stack}; {said}; {_uffd_view()}"

    def gaddr(self, index: int) -> int:
        return int(self.own.gpages[index]) * PAGE_SIZE

    def check_workers(self) -> None:
        for worker in self.workers:
            if worker.error:
                raise Failure(worker.error)

    # --- devices --------------------------------------------------------------------------------
    def do_fork(self) -> None:
        free = [s for s in range(self.slots) if s not in self.devices]
        if not free:
            self.note("fork: no free slot")
            return
        slot = self.rng.choice(free)
        ops = self.rng.randint(2, 30)
        dev_seed = self.rng.randrange(1 << 30)
        state = self.state()
        ctl = self.controller()
        restarts = ctl.restarts  # before the attach: a death from here on may refuse it
        registrar = ctl.prepare_fork()
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the device process: nothing here returns
            code = 3
            try:
                # Dies with the VMM process (a VMM killed as hung would otherwise leave its
                # devices blocked for good on faults nobody serves).
                libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(3)
                os.close(read_fd)
                registrar.register_or_exit()
                assert self.memory is not None
                actor = Actor(f"seed {self.seed} device slot {slot}", self.workers_n + slot,
                              self.memory, self.own, self.versions, random.Random(dev_seed))
                code = device_main(actor, ops, write_fd)
            finally:
                os._exit(code)
        os.close(write_fd)
        registrar.close()
        self.devices[slot] = Device(slot, pid, read_fd, state, restarts)
        self.stats.devices_forked += 1
        self.note(f"fork device slot {slot} pid {pid} ({ops} ops) in {state}")

    def do_kill(self) -> None:
        if not self.devices:
            self.note("kill: no device")
            return
        dev = self.devices[self.rng.choice(sorted(self.devices))]
        faulting = False
        for _ in range(100 if self.fault_delay_ms else 20):  # prefer it waiting on a fault
            with contextlib.suppress(OSError), open(f"/proc/{dev.pid}/wchan") as f:
                if "userfault" in f.read():
                    faulting = True
                    break
            time.sleep(0.002)
        self.note(f"kill device slot {dev.slot} (faulting={faulting})")
        self.stats.killed_while_faulting += faulting
        self.kill_device(dev)

    def kill_device(self, dev: Device) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(dev.pid, signal.SIGKILL)
        os.waitpid(dev.pid, 0)
        os.close(dev.result_fd)
        del self.devices[dev.slot]
        # What it wrote last is unknown: its pages are unchecked until written again.
        self.versions[self.own.owner == self.workers_n + dev.slot] = UNKNOWN
        self.stats.devices_killed += 1

    def reap_devices(self) -> None:
        for dev in list(self.devices.values()):
            pid, _ = os.waitpid(dev.pid, os.WNOHANG)
            if pid:
                self._collect(dev, None)

    def wait_device(self, dev: Device, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(dev.pid, os.WNOHANG)
            if pid:
                self._collect(dev, status)
                return
            time.sleep(0.005)
        raise Failure(f"device slot {dev.slot} (pid {dev.pid}) did not finish in {timeout} s")

    def _collect(self, dev: Device, status: int | None) -> None:
        chunks = []
        while chunk := os.read(dev.result_fd, 1 << 16):
            chunks.append(chunk)
        os.close(dev.result_fd)
        del self.devices[dev.slot]
        message = b"".join(chunks)
        self.stats.devices_exited += 1
        if not message and dev.restarts == self.controller().restarts:
            # The device may have seen the monitor's death before the controller did: a
            # request makes the controller notice it and wait for the successor.
            self.controller().status()
        if not message and self.controller().restarts != dev.restarts:
            # Its registration went to a monitor that died before answering: the device
            # exits before touching guest memory (register_or_exit), as documented.
            self.note(f"device slot {dev.slot}: registration lost to a monitor death")
            self.stats.registrations_lost += 1
            return
        if not message.startswith(b"OK"):
            raise Failure(f"device slot {dev.slot} (forked in {dev.started_in}): "
                          f"{message[3:].decode(errors='replace') or 'exited without a word'}")
        mine = self.own.owner == self.workers_n + dev.slot
        self.versions[mine] = np.frombuffer(message[2:], dtype=np.uint32)
        self.note(f"device slot {dev.slot} done")
