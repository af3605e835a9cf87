"""Test-only entry of the monitor: ``python monitor_entry.py MODULE:FUNCTION --control-fd ...``.

Runs :func:`vmmswap.control.monitor.main` with the page-handler factory named by its first
argument (a fake or fault-injecting handler from this folder). Production code cannot be made to
load a handler like this: the controller starts this file only when a test passes it as
``monitor_command`` (see ``control_vmm.py``).
"""

from __future__ import annotations

import importlib
import os
import sys

from vmmswap.control import monitor, monitor_tracking
from vmmswap.dataplane.dirty import TrackingSupport


def run(argv: list[str]) -> int:
    module, _, name = argv[0].partition(":")
    factory = getattr(importlib.import_module(module), name)
    if os.environ.get("INJECT_NO_TRACKING") == "1":
        # A kernel without WP_ASYNC / PAGEMAP_SCAN, as its feature report would say.
        monitor_tracking.probe_tracking = lambda: TrackingSupport(
            False, "the kernel lacks the uffd features (injected)")
    return monitor.main(argv[1:], handler_factory=factory)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
