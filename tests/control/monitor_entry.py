"""Test-only entry of the monitor: ``python monitor_entry.py MODULE:FUNCTION --control-fd ...``.

Runs :func:`vmmswap.control.monitor.main` with the page-handler factory named by its first
argument (a fake or fault-injecting handler from this folder). Production code cannot be made to
load a handler like this: the controller starts this file only when a test passes it as
``monitor_command`` (see ``control_vmm.py``).
"""

from __future__ import annotations

import importlib
import sys

from vmmswap.control import monitor


def run(argv: list[str]) -> int:
    module, _, name = argv[0].partition(":")
    factory = getattr(importlib.import_module(module), name)
    return monitor.main(argv[1:], handler_factory=factory)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
