"""The vmm-swap data plane against its baselines, measured in one run.

    python benchmarks/bench_data_plane.py [--size MIB] [--repeat N] [--slow-repeat N]
                                          [--skip-sparse] [--skip-pagein] [--no-prewarm] [--json]

(default: a 1 GiB guest, about 3 minutes; ``--size 256 --skip-sparse`` for a quick look).

A child process (the test agent of ``tests/dataplane``) owns guest memory and its uffd, exactly
like a VMM; this process runs the :class:`~vmmswap.dataplane.page_handler.PageHandler` and serves
its
faults. Every figure is compared with a baseline measured in the same run, back to back:

* page-in (sequential read of the whole guest by the child) after ``enable`` (from staging) and
  after ``out`` (from the swap file, page cache warm), readahead on, against one page per fault:
  the same handler with readahead off, the C reference ``benchmarks/c/dataplane_ref_handler.c``
  (crosvm's service in C: pread one page + UFFDIO_COPY), and, when present,
  ``benchmarks/c/uffd_bench.c``'s handler (one constant page per fault, no read at all); and
  against raw UFFDIO_COPY of 2 MiB per ioctl with no fault at all;
* random single-page faults, readahead on against off;
* move to staging against memcpy (warm buffers; also memcpy into fresh memory, for reference);
* swap out against raw sequential pwrite of 2 MiB chunks to the same directory;
* the trim scan, page-state bytes per GiB, and a 16 GiB guest with 512 MiB resident against a
  512 MiB guest fully resident (enable, out, swap in).

The machine is shared and noisy (another engineer's tests may run): each fast figure is the
best of ``--repeat`` runs, each one-page-per-fault baseline the best of ``--slow-repeat``, and
the ratios are what to read. Every measurement starts right after touching memory (see
:func:`prewarm`): the CI VM returns free memory to its host, which otherwise makes whichever
measurement runs first pay the host's page faults.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from c_build import build_c
from vmmswap.dataplane.page_handler import PageHandler
from vmmswap.kernel import libc
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, bytes_to_pages

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test agent and harness

from dataplane.harness import FaultServer, Guest, Vmm  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
REF_SOURCE = HERE / "c" / "dataplane_ref_handler.c"
UFFD_BENCH_SOURCE = HERE / "c" / "uffd_bench.c"
TIMEOUT = 600.0

TARGETS = {
    "pagein_vs_one_page": 10.0,   # at least 10x faster than one page per fault
    "pagein_vs_raw_copy": 0.60,   # at least 60% of raw 2 MiB UFFDIO_COPY
    "random_on_vs_off": 1.10,     # readahead on costs at most 1.1x off
    "move_vs_memcpy": 0.50,       # at least 50% of memcpy
    "frozen_s_per_gib": 0.15,     # the move (what runs with the VMM frozen): at most 0.15 s/GiB
    "out_vs_pwrite": 0.80,        # at least 80% of raw pwrite
    "trim_gb_s": 5.0,             # at least 5 GB/s
    "metadata_mib_per_gib": 1.2,  # at most 1.2 MiB per GiB
    "sparse_vs_dense": 1.5,       # at most 1.5x
}


# --- helpers --------------------------------------------------------------------------------------
def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_warm_bytes = 0


def prewarm() -> None:
    """Touch, then free, enough memory for the next measurement.

    The CI VM hands free memory back to its host (virtio-balloon free page reporting), so the
    first touch of a page costs a fault in the host, several times the cost of the copy being
    measured, and whether a measurement pays it depends on what ran before. Freed pages are
    reported only after a delay, so a measurement that starts right after this allocates pages
    the host backs, and the ratios compare software, not hypervisor, costs.
    """
    if _warm_bytes <= 0:
        return
    step = 64 * MIB
    with Mapping.anonymous(_warm_bytes) as warm:
        for off in range(0, _warm_bytes, step):
            libc.madvise(warm.address + off, min(step, _warm_bytes - off),
                         libc.MADV_POPULATE_WRITE)


class Setup:
    """One guest in the agent, a handler over it, and the cycle helpers."""

    def __init__(self, vmm: Vmm, size: int, swap_dir: str, *, resident: int | None = None,
                 piece: int = MIB) -> None:
        self.vmm = vmm
        self.size = size
        self.guest: Guest = vmm.new_guest([(0, size)], register=False)
        fill: dict[str, Any] = {"op": "fill", "addr": self.guest.addr(0, 0), "length": size}
        if resident is not None and resident < size:
            fill.update(stride=size // (resident // piece), piece=piece)
        vmm.request(fill, None, timeout=TIMEOUT, watch=False)
        # Registered after the fill, so filling costs no fault.
        self.guest.register()
        self.handler = PageHandler.create(self.guest.regions(), swap_dir, readahead=True)
        self.server = FaultServer(self.handler, self.guest.uffd)
        self.pages = bytes_to_pages(size)

    @property
    def addr(self) -> int:
        return self.guest.addr(0, 0)

    def swap_in_all(self) -> None:
        ctx = self.handler.start_swap_in()
        while ctx.swap_in(self.guest.uffd) > 0:
            pass
        ctx.close()

    def stage(self) -> None:
        """Everything back in the guest, then moved to staging the way the monitor's enable
        moves it (prepared first, so staging is mapped and page-in COPYs from the mapping)."""
        self.swap_in_all()
        self.enable()

    def enable(self) -> None:
        """What the monitor's enable does: prepare while the guest runs, then the move."""
        self.handler.prepare_move()
        self.handler.move_to_staging()

    def out_all(self) -> None:
        while self.handler.swap_out() > 0:
            pass

    def seq_read(self, server: FaultServer | None = None, watch: bool = True) -> float:
        reply = self.vmm.request({"op": "seq_read", "addr": self.addr, "length": self.size,
                                  "chunk": MIB}, server, timeout=TIMEOUT, watch=watch)
        return float(reply["elapsed"])

    def close(self) -> None:
        self.handler.close()


# --- page-in --------------------------------------------------------------------------------------
def pagein_python(s: Setup, readahead: bool) -> float:
    s.handler.readahead_enabled = readahead
    try:
        return s.seq_read(s.server)
    finally:
        s.handler.readahead_enabled = True


def pagein_c_ref(s: Setup, binary: Path, source_fd: int, source_offset: int) -> float:
    """crosvm-style C handler (pread + 4 KiB COPY per fault) serving the child's read."""
    uffd = s.guest.uffd.fileno()
    proc = subprocess.Popen(
        [str(binary), "--uffd", str(uffd), "--src", str(source_fd), "--src-offset",
         str(source_offset), "--addr", str(s.addr), "--len", str(s.size)],
        pass_fds=(uffd, source_fd), stdout=subprocess.PIPE, text=True)
    try:
        elapsed = s.seq_read(None, watch=False)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"C reference handler failed ({proc.returncode})")
    json.loads(out)
    return elapsed


def pagein_uffd_bench(s: Setup, binary: Path) -> float:
    """uffd_bench's handler: one constant page per fault, no read of any source."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([str(binary), "handler", "--sock", str(child.fileno())],
                            pass_fds=(child.fileno(),), stdout=subprocess.PIPE, text=True)
    child.close()
    try:
        socket.send_fds(parent, [struct.pack("=QQQ", s.addr, s.size, PAGE_SIZE)],
                        [s.guest.uffd.fileno()])
        parent.settimeout(30)
        if parent.recv(1) != b"g":
            raise RuntimeError("uffd_bench handler did not start")
        elapsed = s.seq_read(None, watch=False)
        proc.communicate(timeout=TIMEOUT)
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return elapsed


def raw_copy(s: Setup, chunk: int = 2 * MIB) -> float:
    """UFFDIO_COPY of the whole (missing) guest from a warm buffer, ``chunk`` per ioctl."""
    with Mapping.anonymous(chunk, populate=True) as src:
        ctypes.memset(src.address, 0x5A, chunk)
        uffd = s.guest.uffd
        start = time.perf_counter()
        for off in range(0, s.size, chunk):
            uffd.copy(s.addr + off, chunk, src.address, wake=False)
        return time.perf_counter() - start


def reconcile_served(s: Setup) -> None:
    """A baseline served the pages behind the handler's back: forget its copies."""
    s.handler.staging.clear_range(0, s.pages)
    s.handler.swap_file.clear_current(0, s.pages)


def bench_pagein(s: Setup, repeat: int, slow_repeat: int, ref: Path, uffd_bench: Path | None,
                 results: dict[str, Any]) -> None:
    size = s.size
    for source in ("staging", "file"):
        best: dict[str, float] = {}

        def prepare() -> None:
            s.stage()
            if source == "file":  # noqa: B023 (called within the iteration)
                s.out_all()
            prewarm()

        def keep(name: str, seconds: float) -> None:
            best[name] = min(best.get(name, float("inf")), seconds)  # noqa: B023

        for _ in range(repeat):
            prepare()
            keep("readahead", pagein_python(s, True))
            prepare()
            keep("raw_copy_2m", raw_copy(s))
            reconcile_served(s)
        log(f"page-in {source}: readahead {gbps(size, best['readahead']):.2f} GB/s, raw COPY "
            f"{gbps(size, best['raw_copy_2m']):.2f} GB/s; one page per fault next (slow)")
        for _ in range(slow_repeat):
            prepare()
            keep("one_page_python", pagein_python(s, False))
            prepare()
            if source == "staging":
                fd, offset = s.handler.staging.fileno(), 0
            else:
                runs = s.handler.swap_file.slot_runs(0, s.pages)
                assert len(runs) == 1, "the swap file is not sequential"
                fd, offset = s.handler.swap_file.fileno(), runs[0][1] * PAGE_SIZE
            keep("one_page_c_ref", pagein_c_ref(s, ref, fd, offset))
            reconcile_served(s)
            if uffd_bench is not None:
                prepare()
                keep("one_page_c_const", pagein_uffd_bench(s, uffd_bench))
                reconcile_served(s)
        row: dict[str, Any] = {k: {"seconds": v, "gb_per_s": gbps(size, v)}
                               for k, v in best.items()}
        ra = best["readahead"]
        one_page = {k: v / ra for k, v in best.items() if k.startswith("one_page")}
        row["speedup_vs_one_page"] = one_page
        row["vs_raw_copy"] = best["raw_copy_2m"] / ra
        results[f"pagein_{source}"] = row
        log(f"page-in {source}: " + ", ".join(f"{k} {v:.1f}x" for k, v in one_page.items())
            + f", {row['vs_raw_copy']:.0%} of raw COPY")


def bench_random(s: Setup, repeat: int, count: int, results: dict[str, Any]) -> None:
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeat * 2):
        readahead = i % 2 == 0
        s.stage()
        prewarm()
        s.handler.readahead_enabled = readahead
        try:
            reply = s.vmm.request({"op": "random_read", "addr": s.addr, "pages": s.pages,
                                   "count": count, "seed": 7 + i // 2}, s.server,
                                  timeout=TIMEOUT)
        finally:
            s.handler.readahead_enabled = True
        times[readahead].append(float(reply["elapsed"]))
    on, off = min(times[True]), min(times[False])
    results["random_faults"] = {"count": count, "on_us_per_fault": on / count * 1e6,
                                "off_us_per_fault": off / count * 1e6, "on_vs_off": on / off}
    log(f"random faults: on {on / count * 1e6:.1f} us, off {off / count * 1e6:.1f} us "
        f"({on / off:.2f}x)")


# --- move, trim, out ------------------------------------------------------------------------------
def memcpy_rates(size: int) -> tuple[float, float]:
    """(warm memcpy GB/s, memcpy into fresh memory GB/s)."""
    n = min(size, 256 * MIB)
    with Mapping.anonymous(n, populate=True) as a, Mapping.anonymous(n, populate=True) as b:
        ctypes.memset(a.address, 7, n)
        warm = min(timed(lambda: ctypes.memmove(b.address, a.address, n)) for _ in range(4))
        fresh_times: list[float] = []
        for _ in range(2):
            with Mapping.anonymous(n) as c:
                dst = c.address
                start = time.perf_counter()
                ctypes.memmove(dst, a.address, n)
                fresh_times.append(time.perf_counter() - start)
    return gbps(n, warm), gbps(n, min(fresh_times))


def raw_move_floor(size: int, chunk: int = 2 * MIB) -> float:
    """The floor of the frozen move: its two kinds of work and nothing else, on two threads.

    A memfd of ``size`` data bytes (4 KiB shmem pages, like the guest's) is ``preadv``ed, 2 MiB
    at a time, into a populated MAP_SHARED mapping of a second memfd (the prepared staging),
    then its pages are punched; the two threads take alternate chunks, as the move's two
    workers do. No planning, no bitmaps, no page state: what copying the resident set inside
    the freeze costs here at best."""
    src = os.memfd_create("vmmswap-bench-floor-src", os.MFD_CLOEXEC)
    dst = os.memfd_create("vmmswap-bench-floor-dst", os.MFD_CLOEXEC)
    try:
        with Mapping.anonymous(chunk, populate=True) as buf:
            ctypes.memset(buf.address, 0x3C, chunk)
            view = memoryview(buf.as_ctypes()).cast("B")
            for off in range(0, size, chunk):
                os.pwrite(src, view, off)
            view.release()
        os.ftruncate(dst, size)
        with Mapping.map_fd(dst, size) as staged:
            staged.madvise(libc.MADV_POPULATE_WRITE, 0, size)
            target = memoryview(staged.as_ctypes()).cast("B")
            punch = libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE

            def work(first: int) -> None:
                for off in range(first * chunk, size, 2 * chunk):
                    done = 0
                    while done < chunk:
                        done += os.preadv(src, [target[off + done:off + chunk]], off + done)
                    libc.fallocate(src, punch, off, chunk)

            with ThreadPoolExecutor(max_workers=2) as pool:
                start = time.perf_counter()
                list(pool.map(work, (0, 1)))
                elapsed = time.perf_counter() - start
            target.release()
        return elapsed
    finally:
        os.close(src)
        os.close(dst)


def raw_pwrite(directory: str, size: int, chunk: int = 2 * MIB) -> float:
    with Mapping.anonymous(chunk, populate=True) as buf:
        ctypes.memset(buf.address, 0x5A, chunk)
        view = memoryview(buf.as_ctypes()).cast("B")
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            start = time.perf_counter()
            for off in range(0, size, chunk):
                os.pwrite(fd, view, off)
            elapsed = time.perf_counter() - start
        finally:
            os.close(fd)
            view.release()
    return elapsed


def raw_pwrite_staged(s: Setup, directory: str, chunk: int = 2 * MIB) -> float:
    """The floor of swap-out: ``pwrite`` of the staged bytes themselves, 2 MiB at a time from
    the staging mapping into a new file, with none of swap-out's bookkeeping. Unlike
    :func:`raw_pwrite` (one hot 2 MiB buffer) the source is the whole staged guest, 4 KiB shmem
    pages that are not in any CPU cache, as swap-out's source is."""
    staging = s.handler.staging
    assert staging.mapped and staging.present.count() == s.pages
    view = staging.view()
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        start = time.perf_counter()
        for off in range(0, s.size, chunk):
            os.pwrite(fd, view[off:off + chunk], off)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def bench_move_trim_out(s: Setup, repeat: int, swap_dir: str, results: dict[str, Any]) -> None:
    """Move, trim and out; each repeat runs three rounds back to back:

    * ``prepared`` -- the monitor's enable: staging prepared while the guest runs, the move
      (what runs frozen), trim, out straight from the staging mapping (pwritev);
    * ``bounce`` -- as before issue 17: no staging mapping, the move ``copy_file_range``s into
      pages allocated while frozen, out reads each chunk into a buffer (next chunk read ahead
      on a helper thread) and writes from there;
    * ``bounce-no-ahead`` -- the same with the read-ahead off (what the helper thread buys or
      costs on two CPUs).
    """
    size = s.size
    modes = ("prepared", "bounce", "bounce-no-ahead")
    moves: dict[str, list[float]] = {m: [] for m in modes}
    outs: dict[str, list[float]] = {m: [] for m in modes}
    preps, trims, pwrites, staged_pwrites = [], [], [], []
    writer = s.handler._writer  # the benchmark toggles its read-ahead
    for _ in range(repeat):
        for mode in modes:
            s.swap_in_all()
            # Forget the stale copies the last round left in the file (trim would find every
            # page clean and out would have nothing to write), and empty the file: out then
            # allocates fresh page cache, like the raw pwrite baseline into a new file.
            s.handler.swap_file.free_range(0, s.pages)
            os.ftruncate(s.handler.swap_file.fileno(), 0)
            if mode != "prepared":
                s.handler.staging.unmap()
            writer._read_ahead = mode != "bounce-no-ahead"
            prewarm()
            if mode == "prepared":
                preps.append(timed(s.handler.prepare_move))
            moves[mode].append(timed(s.handler.move_to_staging))
            if mode == "prepared":
                trims.append(timed(lambda: _trim_all(s)))
                prewarm()
                pwrites.append(raw_pwrite(swap_dir, size))
                prewarm()
                staged_pwrites.append(raw_pwrite_staged(s, swap_dir))
            prewarm()
            outs[mode].append(timed(s.out_all))
    writer._read_ahead = True
    warm, fresh = memcpy_rates(size)
    floors = []
    for _ in range(repeat):
        prewarm()
        floors.append(raw_move_floor(size))
    floor_s = min(floors)
    move = gbps(size, min(moves["prepared"]))
    unprepared = moves["bounce"] + moves["bounce-no-ahead"]
    results["move"] = {"gb_per_s": move, "memcpy_gb_per_s": warm, "memcpy_fresh_gb_per_s": fresh,
                       "vs_memcpy": move / warm, "vs_memcpy_fresh": move / fresh,
                       "frozen_s_per_gib": min(moves["prepared"]) * GIB / size,
                       "floor_s_per_gib": floor_s * GIB / size,
                       "vs_floor": min(moves["prepared"]) / floor_s,
                       "prepare_s_per_gib": min(preps) * GIB / size,
                       "unprepared_gb_per_s": gbps(size, min(unprepared)),
                       "unprepared_s_per_gib": min(unprepared) * GIB / size}
    trim = gbps(size, min(trims))
    results["trim_scan"] = {"gb_per_s": trim}
    out = gbps(size, min(outs["prepared"]))
    raw = gbps(size, min(pwrites))
    bounce = gbps(size, min(outs["bounce"]))
    no_ahead = gbps(size, min(outs["bounce-no-ahead"]))
    staged_raw = gbps(size, min(staged_pwrites))
    results["swap_out"] = {"gb_per_s": out, "pwrite_gb_per_s": raw, "vs_pwrite": out / raw,
                           "pwrite_staged_gb_per_s": staged_raw,
                           "vs_pwrite_staged": out / staged_raw,
                           "bounce_gb_per_s": bounce, "bounce_vs_pwrite": bounce / raw,
                           "bounce_no_ahead_gb_per_s": no_ahead,
                           "no_ahead_vs_pwrite": no_ahead / raw}
    log(f"out: from the mapping {out:.2f} GB/s, through a buffer {bounce:.2f} (read-ahead off "
        f"{no_ahead:.2f}), raw pwrite {raw:.2f}, raw pwrite of the staged bytes {staged_raw:.2f}")
    m = results["move"]
    log(f"move (frozen) {move:.2f} GB/s = {m['frozen_s_per_gib']:.3f} s/GiB, prepared before the "
        f"freeze in {m['prepare_s_per_gib']:.3f} s/GiB; unprepared {m['unprepared_gb_per_s']:.2f} "
        f"GB/s")
    log(f"move {move:.2f} GB/s vs memcpy {warm:.1f} (fresh {fresh:.2f}); trim scan {trim:.1f} "
        f"GB/s; out {out:.2f} GB/s vs pwrite {raw:.2f}")


def _trim_all(s: Setup) -> None:
    ctx = s.handler.start_trim()
    while ctx.trim_pages(1024) is not None:
        pass


# --- sparse guest ---------------------------------------------------------------------------------
def bench_sparse(vmm: Vmm, swap_dir: str, repeat: int, results: dict[str, Any]) -> None:
    resident = 512 * MIB
    rows: dict[str, dict[str, float]] = {}
    for name, size in (("dense_512m", resident), ("sparse_16g", 16 * GIB)):
        s = Setup(vmm, size, swap_dir, resident=resident)
        best = {"enable": float("inf"), "out": float("inf"), "swap_in": float("inf")}
        try:
            for _ in range(repeat):
                s.handler.swap_file.free_range(0, s.pages)  # all resident: fresh file below
                os.ftruncate(s.handler.swap_file.fileno(), 0)
                prewarm()
                best["enable"] = min(best["enable"], timed(s.enable))
                prewarm()
                best["out"] = min(best["out"], timed(s.out_all))
                prewarm()
                best["swap_in"] = min(best["swap_in"], timed(s.swap_in_all))
            rows[name] = best
            rows[name]["metadata_bytes"] = s.handler.metadata_bytes
        finally:
            s.close()
    ratios = {op: rows["sparse_16g"][op] / rows["dense_512m"][op]
              for op in ("enable", "out", "swap_in")}
    results["sparse"] = {"rows": rows, "ratios": ratios}
    log("16 GiB with 512 MiB resident vs 512 MiB: " +
        ", ".join(f"{op} {r:.2f}x" for op, r in ratios.items()))


# --- report ---------------------------------------------------------------------------------------
def report(results: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    rows: list[tuple[str, float, str, bool]] = []

    def add(name: str, value: float, target: str, ok: bool) -> None:
        rows.append((name, value, target, ok))

    t = TARGETS
    for source in ("staging", "file"):
        row = results.get(f"pagein_{source}")
        if row:
            for k, v in row["speedup_vs_one_page"].items():
                add(f"page-in {source}: speed-up vs {k}", v, f">= {t['pagein_vs_one_page']}x",
                    v >= t["pagein_vs_one_page"])
            add(f"page-in {source}: fraction of raw 2 MiB COPY", row["vs_raw_copy"],
                f">= {t['pagein_vs_raw_copy']}", row["vs_raw_copy"] >= t["pagein_vs_raw_copy"])
    if "random_faults" in results:
        v = results["random_faults"]["on_vs_off"]
        add("random faults: readahead on / off", v, f"<= {t['random_on_vs_off']}x",
            v <= t["random_on_vs_off"])
    if "move" in results:
        v = results["move"]["vs_memcpy"]
        add("move to staging / memcpy", v, f">= {t['move_vs_memcpy']}", v >= t["move_vs_memcpy"])
        add("move to staging / memcpy into fresh memory (info)",
            results["move"]["vs_memcpy_fresh"], "-", True)
        v = results["move"]["frozen_s_per_gib"]
        add("move (frozen) s per GiB resident", v, f"<= {t['frozen_s_per_gib']}",
            v <= t["frozen_s_per_gib"])
        add("floor: copy + punch on two threads, s per GiB (info)",
            results["move"]["floor_s_per_gib"], "-", True)
        add("move (frozen) / that floor (info)", results["move"]["vs_floor"], "-", True)
        add("prepare (before the freeze) s per GiB (info)",
            results["move"]["prepare_s_per_gib"], "-", True)
        add("move without preparation s per GiB (info)",
            results["move"]["unprepared_s_per_gib"], "-", True)
        v = results["swap_out"]["vs_pwrite"]
        add("swap out / raw pwrite", v, f">= {t['out_vs_pwrite']}", v >= t["out_vs_pwrite"])
        add("swap out / raw pwrite of the staged bytes (the floor, info)",
            results["swap_out"]["vs_pwrite_staged"], "-", True)
        add("swap out through a buffer, read-ahead on / raw pwrite (info)",
            results["swap_out"]["bounce_vs_pwrite"], "-", True)
        add("swap out through a buffer, read-ahead off / raw pwrite (info)",
            results["swap_out"]["no_ahead_vs_pwrite"], "-", True)
        v = results["trim_scan"]["gb_per_s"]
        add("trim scan GB/s", v, f">= {t['trim_gb_s']}", v >= t["trim_gb_s"])
    v = results["metadata_mib_per_gib"]
    add("page state MiB per GiB", v, f"<= {t['metadata_mib_per_gib']}",
        v <= t["metadata_mib_per_gib"])
    if "sparse" in results:
        for op, v in results["sparse"]["ratios"].items():
            add(f"16 GiB/512 MiB resident vs 512 MiB: {op}", v, f"<= {t['sparse_vs_dense']}x",
                v <= t["sparse_vs_dense"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="guest size in MiB (1024)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each fast figure (3)")
    parser.add_argument("--slow-repeat", type=int, default=2,
                        help="runs of each one-page-per-fault baseline (2)")
    parser.add_argument("--random-faults", type=int, default=20000)
    parser.add_argument("--swap-dir", default=None, help="swap directory (a temporary one)")
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--skip-pagein", action="store_true")
    parser.add_argument("--no-prewarm", action="store_true",
                        help="do not touch memory before each measurement (see prewarm())")
    parser.add_argument("--one-cpu", type=int, default=None, metavar="CPU",
                        help="pin this process and every child (guest agent, handlers) to one "
                        "CPU: the placement that favours one page per fault most (its round "
                        "trip is several times faster when faulter and handler share a CPU)")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args(argv)
    if args.one_cpu is not None:
        os.sched_setaffinity(0, {args.one_cpu})  # children inherit it
    size = args.size * MIB
    global _warm_bytes
    _warm_bytes = 0 if args.no_prewarm else 2 * max(size, 512 * MIB)
    ref = build_c(REF_SOURCE)
    uffd_bench = build_c(UFFD_BENCH_SOURCE) if UFFD_BENCH_SOURCE.exists() else None
    results: dict[str, Any] = {"size_bytes": size}
    with tempfile.TemporaryDirectory(prefix="vmmswap-bench-", dir=args.swap_dir) as swap_dir, \
            Vmm() as vmm:
        s = Setup(vmm, size, swap_dir)
        try:
            results["metadata_mib_per_gib"] = s.handler.metadata_bytes / MIB / (size / GIB)
            bench_move_trim_out(s, args.repeat, swap_dir, results)
            bench_random(s, args.repeat, min(args.random_faults, s.pages), results)
            if not args.skip_pagein:
                bench_pagein(s, args.repeat, args.slow_repeat, ref, uffd_bench, results)
        finally:
            s.close()
        if not args.skip_sparse:
            bench_sparse(vmm, swap_dir, args.repeat, results)
    rows = report(results)
    table = sys.stderr if args.json else sys.stdout
    print(f"\nvmm-swap data plane, {args.size} MiB guest (best of {args.repeat}):", file=table)
    for name, value, target, ok in rows:
        print(f"  {'ok  ' if ok else 'MISS'} {name:<58} {value:8.3f}  target {target}",
              file=table)
    if args.json:
        results["report"] = [{"figure": n, "value": v, "target": t, "ok": ok}
                             for n, v, t, ok in rows]
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
