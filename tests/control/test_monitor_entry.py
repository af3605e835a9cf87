"""The monitor's page handler is chosen by code, never by the environment.

Before the layout issue, ``python -m vmmswap.control.monitor`` imported whatever
``module:function`` ``VMMSWAP_TEST_HANDLER_FACTORY`` named: any process able to set a VMM's
environment could make the fault server run its code. Now only ``monitor_command`` (an argument
of ``SwapController.launch``) can start another entry, and tests use ``monitor_entry.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmswap.control.controller import SwapController
from vmmswap.dataplane.guest_memory import GuestMemory

MIB = 1024 * 1024
pytestmark = pytest.mark.timeout(60)


def test_environment_cannot_choose_the_page_handler(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A module that does not exist: importing it would fail the monitor's start-up.
    monkeypatch.setenv("VMMSWAP_TEST_HANDLER_FACTORY", "no_such_module_here:factory")
    with GuestMemory.create([(0, 2 * MIB)], name="entry test") as memory, \
            SwapController.launch(memory, tmp_path, on_monitor_died=None) as ctl:
        environ = Path(f"/proc/{ctl.monitor_pid}/environ").read_bytes()
        assert b"VMMSWAP_TEST_HANDLER_FACTORY=no_such_module_here" in environ  # it was there
        # The old monitor died at start-up importing that module; this one serves.
        assert ctl.status().state.value == "Ready"


def test_monitor_command_is_validated(tmp_path: Path) -> None:
    with GuestMemory.create([(0, 2 * MIB)], name="entry test") as memory:
        for bad in ([], [""], ["python3", 7]):
            with pytest.raises(ValueError, match="monitor_command"):
                SwapController.launch(memory, tmp_path, on_monitor_died=None,
                                      monitor_command=bad)  # type: ignore[arg-type]
        assert os.listdir(tmp_path) == []   # nothing left behind by the refused launches
