"""A test VMM: a child process with two memfd guest regions under a SwapController.

Run as ``python control_vmm.py``; it reads one JSON command per line on stdin and answers one JSON
line on stdout. It touches guest memory only through GuestMemory.write/read (ctypes memmove:
the GIL is released, so a fault blocks only the calling thread).

Patterns: every 8-byte word of a page holds a value derived from (seed, guest page, word), so a
page that comes back from the wrong place, or as zeros, is detected. Seed 0 writes zeros.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from vmmswap.control import swap_device
from vmmswap.control.controller import RestartPolicy, SwapController, SwapError
from vmmswap.dataplane import discard_log
from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import VMM_SWAP_FEATURES

MIB = 1024 * 1024
#: Test-only: "module:function" building the monitor's page handler (a fake or an injector).
#: Read here, by the test VMM, which then starts the monitor through ``monitor_entry.py``.
HANDLER_FACTORY_ENV = "VMMSWAP_TEST_HANDLER_FACTORY"
_MONITOR_ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "monitor_entry.py")


def monitor_command() -> list[str] | None:
    """The monitor command for this test VMM: the test entry when a factory is named."""
    factory = os.environ.get(HANDLER_FACTORY_ENV)
    return [sys.executable, _MONITOR_ENTRY, factory] if factory else None
#: Two regions, with a gap between them in guest-physical space.
LAYOUT = [(0, 4 * MIB), (16 * MIB, 2 * MIB)]
_WORDS = PAGE_SIZE // 8


def pattern(guest_addr: int, length: int, seed: int) -> bytes:
    if seed == 0:
        return bytes(length)
    words = np.arange(guest_addr // 8, (guest_addr + length) // 8, dtype=np.uint64)
    mixed = words * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(seed * 0x1000193 + 1)
    return mixed.tobytes()


class Vmm:
    def __init__(self) -> None:
        self.memory = GuestMemory.create(LAYOUT, name="control test")
        self.ctl: SwapController | None = None
        self.threads: dict[str, dict[str, Any]] = {}
        self.devices: dict[int, int] = {}
        self.stalled: Callable[[bool], None] | None = None

    def addr(self, region: int, offset: int) -> int:
        return LAYOUT[region][0] + offset

    # --- ops -------------------------------------------------------------------------------------
    def op_launch(self, swap_dir: str, control_socket: str | None = None,
                  readahead: bool = True, max_restarts: int = 5, window: float = 60.0,
                  spare: bool = True, dirty_tracking: bool = False,
                  keep_file_bytes: int = -1) -> dict[str, Any]:
        """``max_restarts=0``: the old policy (a dead monitor is not replaced)."""
        self.restarts: list[dict[str, Any]] = []
        self.deaths: list[str] = []
        self.ctl = SwapController.launch(
            self.memory, swap_dir, readahead=readahead, control_socket=control_socket,
            monitor_command=monitor_command(),
            restart_policy=RestartPolicy(max_restarts, window, spare),
            on_monitor_restarted=lambda info: self.restarts.append(dataclasses.asdict(info)),
            on_monitor_died=lambda err: self.deaths.append(str(err)),
            dirty_tracking=dirty_tracking, keep_file_bytes=keep_file_bytes)
        return {"monitor_pid": self.ctl.monitor_pid}

    def op_restarts(self) -> dict[str, Any]:
        """What the callbacks were told, and the current monitor."""
        assert self.ctl is not None
        return {"restarts": self.restarts, "deaths": self.deaths,
                "monitor_pid": self.ctl.monitor_pid, "spare_pid": self.ctl.spare_pid,
                "kept_devices": self.ctl.kept_device_pids()}

    def op_write(self, region: int, offset: int, length: int, seed: int) -> dict[str, Any]:
        addr = self.addr(region, offset)
        self.memory.write(addr, pattern(addr, length, seed))
        return {}

    def op_verify(self, region: int, offset: int, length: int, seed: int) -> dict[str, Any]:
        addr = self.addr(region, offset)
        got = self.memory.read(addr, length)
        return compare(got, pattern(addr, length, seed))

    def op_read_async(self, name: str, region: int, offset: int, length: int,
                      seed: int) -> dict[str, Any]:
        addr = self.addr(region, offset)
        slot: dict[str, Any] = {}

        def run() -> None:
            slot["result"] = compare(self.memory.read(addr, length),
                                     pattern(addr, length, seed))

        thread = threading.Thread(target=run, daemon=True)
        slot["thread"] = thread
        self.threads[name] = slot
        thread.start()
        return {}

    def op_join(self, name: str, wait: float) -> dict[str, Any]:
        slot = self.threads[name]
        slot["thread"].join(wait)
        if slot["thread"].is_alive():
            return {"blocked": True}
        return {"blocked": False, **slot["result"]}

    def op_remove(self, region: int, offset: int, length: int) -> dict[str, Any]:
        """MADV_REMOVE a range, like a balloon inflating: a REMOVE event for the monitor."""
        libc.madvise(self.memory.host_address(self.addr(region, offset)), length,
                     libc.MADV_REMOVE)
        return {}

    def op_discard(self, region: int, offset: int, length: int) -> dict[str, Any]:
        """A discard through GuestMemory (its discard-log hook marks it first)."""
        self.memory.discard(self.addr(region, offset), length)
        return {}

    def op_discard_stalled(self, region: int, offset: int, length: int) -> dict[str, Any]:
        """A discard whose thread stalls right after its madvise returned, before the hook's
        after-call stores ``discard_made`` (a Python thread waiting for the GIL there, or
        stopped by a freeze): :meth:`op_discard_resume` finishes it."""
        addr = self.addr(region, offset)
        region_ = self.memory.region_of(addr, length)
        hook = self.memory._discard_hook
        assert hook is not None
        after = hook(self.memory.host_address(addr), length)
        region_.mapping.madvise(libc.MADV_REMOVE, addr - region_.guest_addr, length)
        self.stalled = after
        return {}

    def op_discard_resume(self) -> dict[str, Any]:
        """The stalled discard's thread goes on: its after-call, told the madvise succeeded."""
        after, self.stalled = self.stalled, None
        if after is not None:
            after(True)
        return {}

    def op_discard_marks(self) -> dict[str, Any]:
        """What the page state's discard log says: the flag, and the marked pages."""
        assert self.ctl is not None
        state = self.ctl._kept.page_state
        runs = discard_log.pending_runs(state)
        return {"registered": bool(state.registered),
                "marked_pages": sum(end - first for first, end in runs)}

    def op_writer_start(self, region: int, offset: int, length: int) -> dict[str, Any]:
        """A thread rewriting the range with seed 1, 2, 3, ... until stopped (GIL released
        during each write): it keeps writing while the monitor freezes and moves memory."""
        addr = self.addr(region, offset)
        state = {"stop": False, "seed": 0}

        def run() -> None:
            seed = 0
            while not state["stop"]:
                seed += 1
                self.memory.write(addr, pattern(addr, length, seed))
                state["seed"] = seed

        thread = threading.Thread(target=run, daemon=True)
        self.threads["writer"] = {"thread": thread, "state": state}
        thread.start()
        return {}

    def op_readers_start(self, region: int, length: int, threads: int,
                         seed: int) -> dict[str, Any]:
        """``threads`` threads reading (and checking) ``[0, length)`` of ``region`` page by
        page, each from its own start, round and round until stopped: while the pages are out,
        every read is a fault -- a guest that faults without pause."""
        state: dict[str, Any] = {"stop": False, "reads": 0, "bad": 0}
        pages = length // PAGE_SIZE

        def run(first: int) -> None:
            i = first
            while not state["stop"]:
                addr = self.addr(region, (i % pages) * PAGE_SIZE)
                got = self.memory.read(addr, PAGE_SIZE)
                state["bad"] += compare(got, pattern(addr, PAGE_SIZE, seed))["mismatched_pages"]
                state["reads"] += 1
                i += 1

        runners = [threading.Thread(target=run, daemon=True, args=(t * pages // threads,))
                   for t in range(threads)]
        self.threads["readers"] = {"threads": runners, "state": state}
        for thread in runners:
            thread.start()
        return {}

    def op_readers_stop(self) -> dict[str, Any]:
        slot = self.threads.pop("readers")
        slot["state"]["stop"] = True
        for thread in slot["threads"]:
            thread.join(60)
        return {"reads": slot["state"]["reads"], "mismatched_pages": slot["state"]["bad"]}

    def op_writer_stop(self) -> dict[str, Any]:
        slot = self.threads.pop("writer")
        slot["state"]["stop"] = True
        slot["thread"].join(60)
        return {"seed": slot["state"]["seed"]}

    def _ctl(self) -> SwapController:
        assert self.ctl is not None, "launch first"
        return self.ctl

    def op_enable(self) -> dict[str, Any]:
        return {"status": self._ctl().enable().to_dict()}

    def op_trim(self, wait: bool = True) -> dict[str, Any]:
        return {"status": self._ctl().trim(wait=wait, timeout=60).to_dict()}

    def op_out(self, wait: bool = True) -> dict[str, Any]:
        return {"status": self._ctl().swap_out(wait=wait, timeout=60).to_dict()}

    def op_disable(self, wait: bool = True, slow_file_cleanup: bool = False,
                   drop_file: bool = False) -> dict[str, Any]:
        return {"status": self._ctl().disable(slow_file_cleanup=slow_file_cleanup, wait=wait,
                                              timeout=60, drop_file=drop_file).to_dict()}

    def op_status(self) -> dict[str, Any]:
        return {"status": self._ctl().status().to_dict()}

    def op_drop(self) -> dict[str, Any]:
        """Forget the controller without close(): its finaliser must do what close() does."""
        self.ctl = None
        gc.collect()
        return {}

    def op_close(self) -> dict[str, Any]:
        self._ctl().close()
        return {}

    def op_fork_device(self, checks: list[list[int]], writes: list[list[int]],
                       via: str = "prepare", wait_path: str | None = None,
                       unmap_region: int | None = None,
                       linger_path: str | None = None,
                       plain_uffd: bool = False) -> dict[str, Any]:
        """Fork a device process: register its uffd, wait for ``wait_path`` to exist (if
        given), verify ``checks``, apply ``writes`` (each ``[region, offset, length, seed]``);
        with ``linger_path`` it then creates ``linger_path + ".ready"`` and stays until
        ``linger_path`` exists. ``plain_uffd``: its uffd lacks the write-protect features (as
        from an older device binary). It exits 0 when everything matched, 2 on a mismatch, 1
        when registration failed."""
        ctl = self._ctl()
        registrar = ctl.prepare_fork() if via == "prepare" else None
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if unmap_region is not None:  # a device that does not map all guest memory
                    self.memory.regions[unmap_region].mapping.close()
                if plain_uffd:
                    swap_device.swap_features = lambda: VMM_SWAP_FEATURES  # type: ignore
                if registrar is not None:
                    registrar.register_or_exit()
                elif not ctl.register_device_process():
                    os._exit(1)
                while wait_path is not None and not os.path.exists(wait_path):
                    time.sleep(0.01)
                bad = 0
                for region, offset, length, seed in checks:
                    bad += self.op_verify(region, offset, length, seed)["mismatched_pages"]
                for region, offset, length, seed in writes:
                    self.op_write(region, offset, length, seed)
                if linger_path is not None:
                    with open(linger_path + ".ready", "w"):
                        pass
                    while not os.path.exists(linger_path):
                        time.sleep(0.01)
                code = 0 if bad == 0 else 2
            finally:
                os._exit(code)
        if registrar is not None:
            registrar.close()
        return {"pid": pid}

    def op_wait_device(self, pid: int) -> dict[str, Any]:
        _, status = os.waitpid(pid, 0)
        return {"exit_code": os.waitstatus_to_exitcode(status)}


    def op_park(self, seeds: list[list[int]], fail: bool = False) -> dict[str, Any]:
        """Detach the monitor, read guest memory where it lies, compare with ``seeds`` (per
        region, the pattern seed of each page); ``fail``: raise instead of committing, as a
        park whose upload failed does."""
        ctl = self._ctl()
        with ctl.detached() as memory:
            image = memory.image
            got = bytearray(image.size)
            image.read_into(0, memoryview(got))
            want = b"".join(pattern(start + page * PAGE_SIZE, PAGE_SIZE, seed)
                            for (start, _size), region in zip(LAYOUT, seeds, strict=True)
                            for page, seed in enumerate(region))
            # The control: the same bytes read from the guest memfds alone (what a reader
            # that knew nothing of staging and the swap file would park).
            memfds = b"".join(os.pread(fd, size, 0) for fd, (_start, size)
                              in zip(self.memory.memfds(), LAYOUT, strict=True))
            result = {"image": compare(bytes(got), want),
                      "memfds_only": compare(memfds, want),
                      "bytes": {"memory": image.counts.memory, "staging": image.counts.staging,
                                "swap_file": image.counts.swap_file}}
            if fail:
                raise RuntimeError("injected: the store went away in the middle of the park")
            memory.commit()
        return result


def compare(got: bytes, want: bytes) -> dict[str, Any]:
    a = np.frombuffer(got, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    b = np.frombuffer(want, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    bad = np.any(a != b, axis=1)
    zero = np.all(a == 0, axis=1)
    return {"mismatched_pages": int(bad.sum()), "zero_mismatches": int((bad & zero).sum())}


def main() -> None:
    vmm = Vmm()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            result = {"ok": True, **getattr(vmm, f"op_{op}")(**cmd)}
        except SwapError as err:
            result = {"ok": False, "error": type(err).__name__, "message": str(err),
                      "status": err.status.to_dict() if err.status else None}
        except Exception as err:
            result = {"ok": False, "error": type(err).__name__, "message": str(err),
                      "traceback": traceback.format_exc()}
        print(json.dumps(result), flush=True)
        if op == "exit":
            break


if __name__ == "__main__":
    main()
