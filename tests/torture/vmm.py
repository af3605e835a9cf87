"""The VMM process of the torture test: runs scenarios one after another (process reuse).

``python -m tests.torture.vmm SWAP_DIR [SMALL_SWAP_DIR [huge]]`` reads one JSON object per line on
stdin (``{"seed": N, "corrupt": false, "kind": "host"}``; kind ``kvm`` runs the micro-VM
variant) and answers one JSON line per scenario. A scenario
that leaves a thread blocked on a fault ends the process (it answers first, then exits 3).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import warnings

from vmmswap.kernel import libc

from .kvm_scenario import KvmScenario
from .scenario import Options, Scenario


def main() -> None:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the runner
    # The runner sends SIGUSR1 before it kills a hung scenario: every thread's stack to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process: wanted
    swap_dir = sys.argv[1]
    small = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    huge = len(sys.argv) > 3 and sys.argv[3] == "huge"
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        options = Options(swap_dir, small, corrupt=bool(cmd.get("corrupt")), huge_pages=huge,
                          skip_written=bool(cmd.get("skip_written")),
                          park_memfds=bool(cmd.get("park_memfds")))
        kind = KvmScenario if cmd.get("kind") == "kvm" else Scenario
        result = kind(int(cmd["seed"]), options).run()
        print(json.dumps(result), flush=True)
        if result["error"] and "STUCK" in result["error"]:
            os._exit(3)


if __name__ == "__main__":
    main()
