"""The "VMM" of the data-plane tests: a child process that owns guest memory and its uffd.

A uffd belongs to the process that created it, so the faulting side must be a separate process
from the handler. Run as ``python agent.py FD`` where FD is one end of a SOCK_SEQPACKET pair.
Commands are JSON objects; replies are JSON objects (``{"error": ...}`` on failure). ``new``
creates guest memory and a uffd and sends the descriptors back with SCM_RIGHTS.

Every access to guest memory goes through ``ctypes.memmove`` (GIL released), so a thread blocked
on a fault never blocks the command loop's interpreter.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from typing import Any

from vmmswap.dataplane.discard_log import DiscardLog
from vmmswap.dataplane.guest_memory import Backing, GuestMemory
from vmmswap.dataplane.page_state import PageState
from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import VMM_SWAP_FEATURES, Userfaultfd

MAX_MESSAGE = 1 << 20


def page_content(seed: int, index: int = 0) -> bytes:
    """The content a ``write`` with ``seed`` puts in its ``index``-th page (seed 0: zeros)."""
    if seed == 0:
        return bytes(PAGE_SIZE)
    return random.Random(seed * 1_000_003 + index).randbytes(PAGE_SIZE)


def content(seed: int, pages: int) -> bytes:
    return b"".join(page_content(seed, i) for i in range(pages))


def page_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Agent:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.memory: GuestMemory | None = None
        self.uffd: Userfaultfd | None = None
        self._scratch: ctypes.Array[ctypes.c_char] | None = None
        self.pins: list[tuple[int, int]] = []

    def scratch(self, size: int) -> ctypes.Array[ctypes.c_char]:
        """A private, populated buffer for reads (reused: first-touch faults cost)."""
        if self._scratch is None or len(self._scratch) < size:
            self._scratch = (ctypes.c_char * size)()
            ctypes.memset(self._scratch, 1, size)
        return self._scratch

    def close_memory(self) -> None:
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # --- commands -------------------------------------------------------------------------------
    def cmd_new(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        self.close_memory()
        self.memory = GuestMemory.create([(int(g), int(n)) for g, n in cmd["layout"]],
                                         backing=Backing(cmd.get("backing", "4k")))
        self.uffd = Userfaultfd.new(VMM_SWAP_FEATURES)
        regions = [[r.guest_addr, r.host_addr, r.size] for r in self.memory.regions]
        fds = [self.uffd.fileno(), *self.memory.memfds()]
        socket.send_fds(self.sock, [json.dumps({"regions": regions}).encode()], fds)
        return None

    def cmd_write(self, cmd: dict[str, Any]) -> dict[str, Any]:
        data = content(cmd["seed"], cmd.get("pages", 1))
        ctypes.memmove(cmd["addr"], data, len(data))
        return {}

    def cmd_poke(self, cmd: dict[str, Any]) -> dict[str, Any]:
        data = bytes.fromhex(cmd["data"])
        ctypes.memmove(cmd["addr"], data, len(data))
        return {}

    def cmd_read(self, cmd: dict[str, Any]) -> dict[str, Any]:
        buf = ctypes.create_string_buffer(cmd["length"])
        ctypes.memmove(buf, cmd["addr"], cmd["length"])
        return {"data": buf.raw.hex()}

    def cmd_digests(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Per-page digests of ``pages`` pages from ``addr`` (one memmove per page)."""
        buf = ctypes.create_string_buffer(PAGE_SIZE)
        out = []
        for i in range(cmd["pages"]):
            ctypes.memmove(buf, cmd["addr"] + i * PAGE_SIZE, PAGE_SIZE)
            out.append(page_digest(buf.raw))
        return {"digests": out}

    def cmd_digests_many(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``ranges``: ``[addr, pages]`` pairs; the digests of them all, in order."""
        out: list[str] = []
        for addr, pages in cmd["ranges"]:
            out += self.cmd_digests({"addr": addr, "pages": pages})["digests"]
        return {"digests": out}

    def cmd_pin(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Hold a reference on the page at ``addr`` (vmsplice into a pipe nobody reads), as a
        device with I/O in flight does; ``unpin`` drops every such reference."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        iov = (ctypes.c_void_p * 2)(cmd["addr"], cmd.get("length", PAGE_SIZE))
        vmsplice = ctypes.CDLL(None, use_errno=True).vmsplice
        vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_uint]
        if vmsplice(write_end, iov, 1, 0) < 0:
            err = ctypes.get_errno()
            os.close(read_end)
            os.close(write_end)
            raise OSError(err, os.strerror(err))
        self.pins.append((read_end, write_end))
        return {}

    def cmd_unpin(self, cmd: dict[str, Any]) -> dict[str, Any]:
        while self.pins:
            for fd in self.pins.pop():
                os.close(fd)
        return {}

    def cmd_remove(self, cmd: dict[str, Any]) -> dict[str, Any]:
        # MADV_REMOVE on a registered range sends a REMOVE event and waits until it is read.
        libc.madvise(cmd["addr"], cmd["length"], cmd.get("advice", libc.MADV_REMOVE))
        return {}

    def cmd_threads_read(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``n`` threads read the same page at once (duplicated faults)."""
        bufs = [ctypes.create_string_buffer(8) for _ in range(cmd["threads"])]
        barrier = threading.Barrier(cmd["threads"])

        def reader(buf: ctypes.Array[ctypes.c_char]) -> None:
            barrier.wait()
            ctypes.memmove(buf, cmd["addr"], 8)

        threads = [threading.Thread(target=reader, args=(b,)) for b in bufs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"data": [b.raw.hex() for b in bufs]}

    def cmd_fill(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Write a fast, non-zero pattern over a big range (benchmarks): page i starts with
        its index, the rest of the page is a constant."""
        import numpy as np  # noqa: PLC0415 (only the benchmarks need it)

        addr, length = cmd["addr"], cmd["length"]
        # ``stride``/``piece``: write ``piece`` bytes at the start of every ``stride`` bytes.
        stride = cmd.get("stride", length)
        piece = cmd.get("piece", stride)
        chunk = 64 << 20
        words = PAGE_SIZE // 8
        for base in range(0, length, stride):
            todo = min(piece, length - base)
            for off in range(base, base + todo, chunk):
                n = min(chunk, base + todo - off) // PAGE_SIZE
                arr = np.full((n, words), 0x5A5A5A5A5A5A5A5A, dtype=np.uint64)
                first = off // PAGE_SIZE
                arr[:, 0] = np.arange(first, first + n, dtype=np.uint64) + 1
                ctypes.memmove(addr + off, arr.ctypes.data, n * PAGE_SIZE)
        return {}

    def cmd_check_fill(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Compare a range with what ``fill`` (no stride) wrote there, every byte; returns the
        number of 4 KiB pages that differ."""
        import numpy as np  # noqa: PLC0415 (only the benchmarks need it)

        addr, length = cmd["addr"], cmd["length"]
        chunk = 64 << 20
        words = PAGE_SIZE // 8
        bad = 0
        for off in range(0, length, chunk):
            n = min(chunk, length - off) // PAGE_SIZE
            got = np.empty((n, words), dtype=np.uint64)
            ctypes.memmove(got.ctypes.data, addr + off, n * PAGE_SIZE)
            first = off // PAGE_SIZE
            wrong = (got[:, 1:] != 0x5A5A5A5A5A5A5A5A).any(axis=1)
            wrong |= got[:, 0] != np.arange(first, first + n, dtype=np.uint64) + 1
            bad += int(np.count_nonzero(wrong))
        return {"bad": bad}

    def cmd_write_many(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``writes``: a list of ``[addr, seed]``, each one page of ``page_content(seed)``."""
        for addr, seed in cmd["writes"]:
            data = page_content(seed)
            ctypes.memmove(addr, data, len(data))
        return {}

    def cmd_log_discards(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Map the page state sent along (SCM_RIGHTS) and announce every discard in it."""
        assert self.memory is not None
        fds = cmd["_fds"]
        state = PageState.attach(fds[0])
        self.memory.set_discard_hook(DiscardLog(state).announce if cmd.get("on", True)
                                     else None)
        return {}

    def cmd_discard_many(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``ranges``: ``[guest_addr, length]`` pairs, each given to ``GuestMemory.discard``."""
        assert self.memory is not None
        for guest_addr, length in cmd["ranges"]:
            self.memory.discard(guest_addr, length)
        return {}

    def cmd_drop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Unmap guest memory and close the uffd (frees hugetlb pages for the pool)."""
        self.close_memory()
        return {}

    def cmd_seq_read(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Read a range front to back in ``chunk`` pieces; returns the elapsed time."""
        addr, length = cmd["addr"], cmd["length"]
        chunk = cmd.get("chunk", 1 << 20)
        buf = self.scratch(chunk)
        start = time.perf_counter()
        for off in range(0, length, chunk):
            ctypes.memmove(buf, addr + off, min(chunk, length - off))
        return {"elapsed": time.perf_counter() - start}

    def cmd_reverse_read(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Read 8 bytes of every page, last page first."""
        buf = self.scratch(8)
        for i in range(cmd["pages"] - 1, -1, -1):
            ctypes.memmove(buf, cmd["addr"] + i * PAGE_SIZE, 8)
        return {}

    def cmd_random_read(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Read 8 bytes of ``count`` distinct random pages; returns the elapsed time."""
        addr, pages = cmd["addr"], cmd["pages"]
        order = random.Random(cmd.get("seed", 1)).sample(range(pages), cmd["count"])
        buf = self.scratch(8)
        move = ctypes.memmove
        start = time.perf_counter()
        for i in order:
            move(buf, addr + i * PAGE_SIZE, 8)
        return {"elapsed": time.perf_counter() - start}

    def run(self) -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 4,
                                                          socket.MSG_CMSG_CLOEXEC)
            except ConnectionResetError:
                return
            if not msg:
                return
            cmd = json.loads(msg)
            cmd["_fds"] = fds
            op = cmd["op"]
            if op == "exit":
                self.close_memory()
                self.sock.send(b"{}")
                return
            try:
                reply = getattr(self, f"cmd_{op}")(cmd)
            except Exception as err:
                reply = {"error": f"{type(err).__name__}: {err}"}
            if reply is not None:
                self.sock.send(json.dumps(reply).encode())


def main() -> None:
    # Die with the test process: a blocked fault must never outlive it.
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        sys.exit(1)
    sock = socket.socket(fileno=int(sys.argv[1]))
    Agent(sock).run()


if __name__ == "__main__":
    main()
