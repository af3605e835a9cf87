"""A pure-Python userfaultfd fault handler against a C reference, measured in one run.

    python benchmarks/bench_uffd.py [--pages N] [--repeat R] [--json]

What is measured (each figure is the median of ``--repeat`` runs):

* **single-page fault round trip**: a C faulter (``benchmarks/c/uffd_bench.c``) touches N missing
  pages one after the other; a handler in another process reads each fault and answers with a
  4 KiB UFFDIO_COPY. The handler is either the C reference or ``vmmswap.uffd.userfaultfd`` driven
  from
  Python (``read_events`` + ``copy``). Two placements: handler pinned on the faulter's CPU, and on
  the other CPU.
* **UFFDIO_COPY throughput** with no waiters, at 4 KiB, 64 KiB and 2 MiB per call: C ioctls against
  ``Userfaultfd.copy`` calls from Python over the same range.

The C program is compiled with gcc into a cache directory at run time. The machine is shared and
noisy; compare the ratios, which are measured back to back, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from c_build import build_c
from vmmswap.control.fault_spin import AdaptiveSpin
from vmmswap.kernel import libc
from vmmswap.uffd.errors import PageExistsError
from vmmswap.uffd.events import PageFault
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE, bytes_to_pages
from vmmswap.uffd.userfaultfd import Userfaultfd

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "c" / "uffd_bench.c"
FILL_BYTE = 0xA5
RANGE_MSG = struct.Struct("=QQQ")  # addr, len, page size: what uffd_bench faulter sends
KIB = 1024
MIB = 1024 * KIB
RUN_TIMEOUT_S = 120.0

# Targets from the issue: Python within these factors of C.
ROUND_TRIP_TARGET = 1.2
COPY_2M_TARGET = 1.1
# The monitor's way (epoll + non-blocking read) with its adaptive spin: p50 of a fault served on
# the other CPU, in microseconds. An absolute figure, as the issue states it; read it next to
# python-epoll (the same loop without spinning) measured in the same run.
CROSS_CPU_SPIN_P50_TARGET_US = 25.0
HANDLERS = ("c", "python", "python-epoll", "python-spin")


# --- the Python handler (runs in its own process, like the C one) -------------------------------
def python_handler(sock_fd: int, cpu: int, mode: str = "block") -> int:
    """Serve every fault of the faulter's range with ``Userfaultfd.copy``; the hot loop under test.

    ``block``: one ``read_events`` (a read of up to 64 messages, blocking with the GIL released),
    then one ``copy`` per missing fault. ``epoll``: the monitor's way, a non-blocking uffd read
    after ``epoll.poll``. ``spin``: ``epoll`` plus the monitor's adaptive spin
    (:class:`vmmswap.control.fault_spin.AdaptiveSpin`) after each round that served a fault.
    Prints the faults served and the CPU time this process used per fault.
    """
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    sock = socket.socket(fileno=sock_fd)
    msg, fds, _, _ = socket.recv_fds(sock, RANGE_MSG.size, 1, socket.MSG_CMSG_CLOEXEC)
    _addr, length, page_size = RANGE_MSG.unpack(msg)
    if page_size != PAGE_SIZE:
        raise SystemExit(f"page size mismatch: faulter {page_size}, handler {PAGE_SIZE}")
    if mode != "block":
        os.set_blocking(fds[0], False)
    with Userfaultfd.from_raw_descriptor(fds[0]) as uffd, \
            Mapping.anonymous(PAGE_SIZE, populate=True) as src:
        src.write(0, bytes([FILL_BYTE]) * PAGE_SIZE)
        pages = bytes_to_pages(length)
        read_events, copy, wake = uffd.read_events, uffd.copy, uffd.wake
        src_addr = src.address
        served = 0

        def serve() -> int:
            nonlocal served
            seen = 0
            for event in read_events():
                if type(event) is PageFault:
                    seen += 1
                    # Without Feature.EXACT_ADDRESS the kernel reports the page's base address.
                    dst = event.address
                    try:
                        copy(dst, PAGE_SIZE, src_addr)
                    except PageExistsError:
                        wake(dst, PAGE_SIZE)
                        continue
                    served += 1
            return seen

        spinner = AdaptiveSpin() if mode == "spin" else None
        epoll = select.epoll()
        epoll.register(uffd.fileno(), select.EPOLLIN)
        cpu0 = time.process_time()
        sock.send(b"g")
        while served < pages:
            if mode == "block":
                serve()
                continue
            epoll.poll()
            if serve() and spinner is not None:
                spinner.spin(serve)
        cpu_s = time.process_time() - cpu0
        epoll.close()
    stats = spinner.stats if spinner is not None else None
    print(json.dumps({"served": served, "cpu_ns_per_fault": cpu_s / max(served, 1) * 1e9,
                      "caught": stats.caught if stats else 0,
                      "spin_s": stats.seconds if stats else 0.0}), flush=True)
    return 0


# --- the driver --------------------------------------------------------------------------------
@dataclass
class RoundTrip:
    handler: str
    placement: str
    mean_us: float
    p50_us: float
    p99_us: float
    cpu_ns_per_fault: float = 0.0  # the handler's CPU time per fault (Python handlers only)


def one_round_trip(binary: Path, handler: str, faulter_cpu: int, handler_cpu: int,
                   pages: int) -> dict[str, float]:
    a, b = socket.socketpair()
    with a, b:
        faulter = subprocess.Popen(
            [str(binary), "faulter", "--sock", str(a.fileno()), "--pages", str(pages),
             "--cpu", str(faulter_cpu)], pass_fds=[a.fileno()], stdout=subprocess.PIPE)
        if handler == "c":
            cmd = [str(binary), "handler", "--sock", str(b.fileno()), "--cpu", str(handler_cpu)]
        else:
            mode = handler.partition("-")[2] or "block"
            cmd = [sys.executable, __file__, "_python-handler", "--sock", str(b.fileno()),
                   "--cpu", str(handler_cpu), "--mode", mode]
        served = subprocess.Popen(cmd, pass_fds=[b.fileno()], stdout=subprocess.PIPE)
    try:
        out, _ = faulter.communicate(timeout=RUN_TIMEOUT_S)
        handler_out, _ = served.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        for proc in (faulter, served):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if faulter.returncode or served.returncode:
        raise RuntimeError(f"{handler} run failed: faulter {faulter.returncode}, "
                           f"handler {served.returncode}")
    result: dict[str, float] = json.loads(out)
    if handler != "c":
        result["cpu_ns_per_fault"] = json.loads(handler_out)["cpu_ns_per_fault"]
    return result


def round_trips(binary: Path, pages: int, repeat: int) -> list[RoundTrip]:
    cpus = sorted(os.sched_getaffinity(0))
    placements = [("same-cpu", cpus[0], cpus[0])]
    if len(cpus) > 1:
        placements.append(("cross-cpu", cpus[0], cpus[1]))
    results = []
    for placement, fcpu, hcpu in placements:
        runs: dict[str, list[dict[str, float]]] = {h: [] for h in HANDLERS}
        for _ in range(repeat):
            for handler in HANDLERS:  # interleaved, so drift hits all alike
                runs[handler].append(one_round_trip(binary, handler, fcpu, hcpu, pages))
        for handler, rs in runs.items():
            results.append(RoundTrip(
                handler, placement,
                statistics.median(r["mean_ns"] for r in rs) / 1000,
                statistics.median(r["p50_ns"] for r in rs) / 1000,
                statistics.median(r["p99_ns"] for r in rs) / 1000,
                statistics.median(r.get("cpu_ns_per_fault", 0.0) for r in rs)))
    return results


@dataclass
class CopyRate:
    handler: str
    chunk: int
    ns_per_page: float
    gb_per_s: float


def python_copy(chunk: int, total: int, passes: int, cpu: int) -> float:
    """Best pass time (ns) filling ``total`` bytes in ``chunk``-byte ``Userfaultfd.copy`` calls."""
    os.sched_setaffinity(0, {cpu})
    with Userfaultfd.new() as uffd, Mapping.anonymous(total) as dst, \
            Mapping.anonymous(chunk, populate=True) as src:
        src.write(0, bytes([FILL_BYTE]) * chunk)
        uffd.register(dst.address, total)
        copy, src_addr, base = uffd.copy, src.address, dst.address
        offsets = range(0, total, chunk)
        best = float("inf")
        for _ in range(passes):
            dst.madvise(libc.MADV_DONTNEED)  # empty the range again
            t0 = time.perf_counter_ns()
            for off in offsets:
                copy(base + off, chunk, src_addr)
            best = min(best, time.perf_counter_ns() - t0)
    return best


def copy_rates(binary: Path, total: int, passes: int, repeat: int) -> list[CopyRate]:
    cpu = sorted(os.sched_getaffinity(0))[0]
    saved = os.sched_getaffinity(0)
    results = []
    try:
        for chunk in (4 * KIB, 64 * KIB, 2 * MIB):
            c_ns: list[float] = []
            py_ns: list[float] = []
            for _ in range(repeat):
                out = subprocess.run(
                    [str(binary), "copy", "--chunk", str(chunk), "--total", str(total),
                     "--passes", str(passes), "--cpu", str(cpu)],
                    check=True, capture_output=True, timeout=RUN_TIMEOUT_S).stdout
                c_ns.append(json.loads(out)["ns_per_page"])
                py_ns.append(python_copy(chunk, total, passes, cpu) / bytes_to_pages(total))
            for name, values in (("c", c_ns), ("python", py_ns)):
                ns = statistics.median(values)
                results.append(CopyRate(name, chunk, ns, PAGE_SIZE / ns))
    finally:
        os.sched_setaffinity(0, saved)
    return results


def ratio(rows: list[RoundTrip] | list[CopyRate], key: str, match: dict[str, object],
          handler: str = "python") -> float:
    def pick(handler: str) -> float:
        for row in rows:
            if row.handler == handler and all(getattr(row, k) == v for k, v in match.items()):
                return float(getattr(row, key))
        raise KeyError(match)
    return pick(handler) / pick("c")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=16384, help="faults per round-trip run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--copy-mib", type=int, default=64, help="MiB per copy pass")
    parser.add_argument("--passes", type=int, default=3, help="copy passes per run (best)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = parser.add_subparsers(dest="role")
    handler = sub.add_parser("_python-handler", help=argparse.SUPPRESS)
    handler.add_argument("--sock", type=int, required=True)
    handler.add_argument("--cpu", type=int, default=-1)
    handler.add_argument("--mode", choices=("block", "epoll", "spin"), default="block")
    args = parser.parse_args(argv)
    if args.role == "_python-handler":
        return python_handler(args.sock, args.cpu, args.mode)

    binary = build_c(C_SOURCE)
    rts = round_trips(binary, args.pages, args.repeat)
    rates = copy_rates(binary, args.copy_mib * MIB, args.passes, args.repeat)
    ratios: dict[str, float] = {}
    for placement in sorted({r.placement for r in rts}, reverse=True):
        ratios[f"round_trip_{placement}"] = ratio(rts, "mean_us", {"placement": placement})
        ratios[f"round_trip_{placement}_p50"] = ratio(rts, "p50_us", {"placement": placement})
        ratios[f"round_trip_{placement}_spin_p50"] = ratio(
            rts, "p50_us", {"placement": placement}, "python-spin")
    for chunk in sorted({r.chunk for r in rates}):
        ratios[f"copy_{chunk // KIB}k"] = ratio(rates, "ns_per_page", {"chunk": chunk})

    if args.json:
        print(json.dumps({"round_trips": [asdict(r) for r in rts],
                          "copy": [asdict(r) for r in rates], "ratios": ratios}, indent=2))
        return 0
    print(f"single-page fault round trip, {args.pages} faults, median of {args.repeat} runs")
    print(f"  {'placement':<10} {'handler':<12} {'mean us':>8} {'p50 us':>8} {'p99 us':>8} "
          f"{'CPU us/fault':>12}")
    for r in rts:
        cpu = f"{r.cpu_ns_per_fault / 1000:12.2f}" if r.handler != "c" else f"{'-':>12}"
        print(f"  {r.placement:<10} {r.handler:<12} {r.mean_us:8.2f} {r.p50_us:8.2f} "
              f"{r.p99_us:8.2f} {cpu}")
    for r in rts:
        if r.handler == "python-spin" and r.placement == "cross-cpu":
            ok = r.p50_us <= CROSS_CPU_SPIN_P50_TARGET_US
            print(f"  cross-CPU p50 with the monitor's spin: {r.p50_us:.2f} us, target <= "
                  f"{CROSS_CPU_SPIN_P50_TARGET_US:.0f} us: {'met' if ok else 'MISSED'}")
    print(f"UFFDIO_COPY throughput, {args.copy_mib} MiB per pass, no waiters")
    print(f"  {'chunk':<8} {'handler':<7} {'ns/page':>8} {'GB/s':>7}")
    for c in rates:
        print(f"  {c.chunk // KIB:>5} KiB {c.handler:<7} {c.ns_per_page:8.1f} {c.gb_per_s:7.2f}")
    print("ratios python/c (time; lower is better; round trips by mean and by median fault)")
    for name, value in ratios.items():
        target = (None if "spin" in name else
                  ROUND_TRIP_TARGET if name.startswith("round_trip") else
                  COPY_2M_TARGET if name == "copy_2048k" else None)
        verdict = "" if target is None else (
            f"  target <= {target:.2f}: {'met' if value <= target else 'MISSED'}")
        print(f"  {name:<26} {value:6.3f}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
