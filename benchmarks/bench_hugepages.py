"""Page-in of a swapped-out guest on 4 KiB pages, shmem THP and 2 MiB hugetlbfs, in one run.

    python benchmarks/bench_hugepages.py [--size MIB] [--repeat N] [--json]

(default: a 1 GiB guest, best of 3; root, since THP and the hugetlb pool are machine settings,
which are restored at the end.)

For each backing a child process (the test agent of ``tests/dataplane``) fills its guest memory,
registers it, and this process runs the :class:`~vmmswap.dataplane.page_handler.PageHandler`:
enable, trim, out, then the child reads the whole guest front to back and every fault is served
from the swap file (page cache warm). Reported per backing:

* page-in throughput and the faults it took;
* the same guest filled with raw UFFDIO_COPY of 2 MiB per ioctl from a warm buffer, no fault,
  no read (the ceiling of any handler), and page-in as a fraction of it
  (target: hugetlbfs >= 80 %);
* for THP, ``ShmemPmdMapped`` of the child's guest mapping before enable and after disable:
  the fills allocate small pages, so the guest comes back without huge pages unless they are
  collapsed again (``MADV_COLLAPSE`` through ``process_madvise`` on the child, after disable);
  both figures are given (target: after >= 90 % of before).

Every page is checked after the page-in (first word of each 4 KiB page, the fill's index
pattern); a mismatch fails the run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test agent and harness

from dataplane.harness import FaultServer, Guest, Vmm  # noqa: E402
from vmmswap.dataplane.huge_pages import collapse, pmd_mapped_bytes  # noqa: E402
from vmmswap.dataplane.page_handler import PageHandler  # noqa: E402
from vmmswap.uffd.memory import Mapping  # noqa: E402
from vmmswap.vm.hugetlb_pool import HugetlbPool  # noqa: E402

MIB = 1024 * 1024
HUGE = 2 * MIB
TIMEOUT = 600.0
SHMEM_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
TARGETS = {"hugetlb_vs_raw_copy": 0.80, "thp_pmd_kept": 0.90}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class ShmemThp:
    """shmem_enabled set to ``mode`` for the run, the old mode restored in close."""

    def __init__(self, mode: str) -> None:
        match = re.search(r"\[(\w+)\]", SHMEM_ENABLED.read_text())
        if match is None:
            raise RuntimeError(f"cannot parse {SHMEM_ENABLED}")
        self.old = match.group(1)
        SHMEM_ENABLED.write_text(mode)

    def close(self) -> None:
        SHMEM_ENABLED.write_text(self.old)


class Setup:
    """One guest of ``backing`` in the agent, filled, registered, and a handler over it."""

    def __init__(self, vmm: Vmm, size: int, backing: str, swap_dir: str,
                 max_readahead_bytes: int | None) -> None:
        self.vmm, self.size, self.backing = vmm, size, backing
        self.guest: Guest = vmm.new_guest([(0, size)], register=False, backing=backing)
        self.addr = self.guest.specs[0].host_addr
        self.fill()
        self.guest.register()
        self.handler = PageHandler.create(self.guest.regions(), swap_dir, readahead=True,
                                          max_readahead_bytes=max_readahead_bytes)
        self.server = FaultServer(self.handler, self.guest.uffd)

    def fill(self) -> None:
        self.vmm.request({"op": "fill", "addr": self.addr, "length": self.size}, None,
                         timeout=TIMEOUT, watch=False)

    def pmd_mapped(self) -> int:
        return pmd_mapped_bytes(self.vmm.proc.pid, self.addr, self.addr + self.size)

    def swapped_out(self) -> None:
        """Everything moved to staging, trimmed and written to the swap file."""
        h = self.handler
        h.move_to_staging()
        ctx = h.start_trim()
        while ctx.trim_pages() is not None:
            pass
        while h.swap_out() > 0:
            pass
        assert h.staging_pages == 0 and h.swap_pages == h.num_pages, "not all swapped out"

    def page_in(self) -> tuple[float, int]:
        """The child reads the whole guest; returns (seconds, faults)."""
        before = len(self.server.faults)
        reply = self.vmm.request({"op": "seq_read", "addr": self.addr, "length": self.size,
                                  "chunk": MIB}, self.server, timeout=TIMEOUT)
        return float(reply["elapsed"]), len(self.server.faults) - before

    def swap_in_rest(self) -> None:
        ctx = self.handler.start_swap_in()
        while ctx.swap_in(self.guest.uffd) > 0:
            pass
        ctx.close()

    def verify(self) -> int:
        """4 KiB pages whose first word is not the fill's index pattern (0 = all good)."""
        reply = self.vmm.request({"op": "check_fill", "addr": self.addr, "length": self.size},
                                 None, timeout=TIMEOUT)
        return int(reply["bad"])

    def raw_copy(self) -> float:
        """UFFDIO_COPY of the whole (missing) guest, 2 MiB per ioctl, from a warm buffer."""
        with Mapping.anonymous(HUGE, populate=True) as src:
            ctypes.memset(src.address, 0x5A, HUGE)
            uffd = self.guest.uffd
            start = time.perf_counter()
            for off in range(0, self.size, HUGE):
                uffd.copy(self.addr + off, HUGE, src.address, wake=False)
            return time.perf_counter() - start

    def empty(self) -> None:
        """Punch the guest out (the handler forgets nothing it holds: call after swap-in)."""
        self.guest.uffd.unregister(self.addr, self.size)
        self.vmm.request({"op": "remove", "addr": self.addr, "length": self.size}, None)
        self.guest.register()

    def close(self) -> None:
        self.handler.close()


def bench_backing(vmm: Vmm, size: int, backing: str, repeat: int, swap_dir: str,
                  max_readahead_bytes: int | None) -> dict[str, Any]:
    s = Setup(vmm, size, backing, swap_dir, max_readahead_bytes)
    row: dict[str, Any] = {"backing": backing, "page_size": s.handler.page_size,
                           "max_readahead_bytes": max_readahead_bytes}
    try:
        best_in, faults, best_raw = float("inf"), 0, float("inf")
        for i in range(repeat):
            if backing == "thp" and i == 0:
                row["pmd_before"] = s.pmd_mapped()
            s.swapped_out()
            seconds, n = s.page_in()
            s.swap_in_rest()
            bad = s.verify()
            if bad:
                raise RuntimeError(f"{backing}: {bad} pages wrong after page-in")
            if seconds < best_in:
                best_in, faults = seconds, n
            if backing == "thp" and i == 0:
                row["pmd_after_disable"] = s.pmd_mapped()
                s.guest.uffd.unregister(s.addr, s.size)  # disable unregisters, then collapse
                start = time.perf_counter()
                collapse(vmm.proc.pid, s.addr, s.size)
                row["collapse_seconds"] = time.perf_counter() - start
                row["pmd_after_collapse"] = s.pmd_mapped()
                s.guest.register()
            # Raw COPY ceiling: empty the guest (no handler copies are live now: all are
            # back in the guest), fill it by COPY, then refill it with the pattern.
            s.empty()
            best_raw = min(best_raw, s.raw_copy())
            s.guest.uffd.unregister(s.addr, s.size)
            s.fill()
            s.guest.register()
        row.update(pagein_seconds=best_in, pagein_gb_s=gbps(size, best_in), faults=faults,
                   raw_copy_seconds=best_raw, raw_copy_gb_s=gbps(size, best_raw),
                   vs_raw_copy=best_raw / best_in)
        if "pmd_before" in row:
            before = row["pmd_before"] or 1
            row["pmd_kept_after_disable"] = row["pmd_after_disable"] / before
            row["pmd_kept_after_collapse"] = row["pmd_after_collapse"] / before
        log(f"{backing}: page-in {row['pagein_gb_s']:.2f} GB/s, {faults} faults, raw COPY "
            f"{row['raw_copy_gb_s']:.2f} GB/s ({row['vs_raw_copy']:.0%})")
        return row
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, metavar="MIB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--readahead-mib", type=int, default=None, metavar="MIB",
                        help="the handler's max_readahead_bytes (default: the handler's, "
                             "2 MiB, or 4 huge pages on hugetlbfs)")
    parser.add_argument("--only", choices=("4k", "thp", "2M"), action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = args.size * MIB
    if size % HUGE:
        raise SystemExit("--size must be a multiple of 2 MiB")
    import tempfile  # noqa: PLC0415

    results: dict[str, Any] = {"size": size, "rows": []}
    backings = args.only or ["4k", "thp", "2M"]
    with tempfile.TemporaryDirectory() as swap_dir, Vmm() as vmm:
        for backing in backings:
            thp = ShmemThp("advise") if backing == "thp" else None
            pool = HugetlbPool(size // HUGE) if backing == "2M" else None
            try:
                ra = None if args.readahead_mib is None else args.readahead_mib * MIB
                results["rows"].append(bench_backing(vmm, size, backing, args.repeat, swap_dir,
                                                     ra))
            finally:
                if vmm.guest is not None:
                    vmm.guest.close()
                    vmm.guest = None
                vmm.request({"op": "drop"}, None)  # the child unmaps its guest memory
                if pool is not None:
                    pool.close()
                if thp is not None:
                    thp.close()
    print(f"{'backing':<8} {'page-in GB/s':>12} {'faults':>8} {'raw COPY GB/s':>14} "
          f"{'of raw':>7}")
    for row in results["rows"]:
        print(f"{row['backing']:<8} {row['pagein_gb_s']:>12.2f} {row['faults']:>8} "
              f"{row['raw_copy_gb_s']:>14.2f} {row['vs_raw_copy']:>7.0%}")
    for row in results["rows"]:
        if row["backing"] == "2M":
            ok = row["vs_raw_copy"] >= TARGETS["hugetlb_vs_raw_copy"]
            print(f"hugetlb page-in vs raw 2 MiB COPY: {row['vs_raw_copy']:.0%} (target >= "
                  f"{TARGETS['hugetlb_vs_raw_copy']:.0%}) {'ok' if ok else 'MISSED'}")
        if "pmd_before" in row:
            for key, label in (("pmd_kept_after_disable", "after disable"),
                               ("pmd_kept_after_collapse", "after disable + MADV_COLLAPSE")):
                ok = row[key] >= TARGETS["thp_pmd_kept"]
                print(f"THP ShmemPmdMapped {label}: {row[key]:.0%} of before "
                      f"({row['pmd_before'] // MIB} MiB before; target >= "
                      f"{TARGETS['thp_pmd_kept']:.0%}) {'ok' if ok else 'MISSED'}")
    if args.json:
        print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
