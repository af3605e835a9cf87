"""Park's first step on the test VMM: the monitor detaches, and guest memory is read where it
lies -- resident, in staging, in the swap file -- without a page coming back into RAM; a park
called off brings a successor that serves every page as before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from control_helpers import MIB, Model, TestVmm

from vmmswap.control.protocol import ProtocolError, decode_request

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def handler_env() -> dict[str, str]:
    """The data plane's PageHandler: the page state the park reads is its own."""
    return {}


def _filled(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> tuple[TestVmm, Model]:
    vmm = make_vmm()
    vmm.launch(swap_dir)
    model = Model(vmm)
    model.write(0, 0, 3 * MIB, seed=1)
    model.write(1, 256 * 1024, 1 * MIB, seed=2)
    return vmm, model


def _park(vmm: TestVmm, model: Model, **kw: Any) -> dict[str, Any]:
    return vmm.call("park", seeds=model.seeds, **kw)


def test_park_reads_swapped_out_memory_where_it_lies(make_vmm: Callable[..., TestVmm],
                                                    swap_dir: Path) -> None:
    vmm, model = _filled(make_vmm, swap_dir)
    vmm.ok("enable")
    vmm.ok("out")
    model.write(0, 1 * MIB, 128 * 1024, seed=3)   # faulted back in and rewritten: resident
    got = _park(vmm, model)
    assert got["ok"], got
    assert got["image"]["mismatched_pages"] == 0, got
    assert got["bytes"]["swap_file"] >= 3 * MIB and got["bytes"]["memory"] > 0, got
    # The control: the memfds alone hold little of it (zeros where the data is; the rewrite's
    # readahead brought a few neighbours back).
    assert got["memfds_only"]["zero_mismatches"] >= 3 * MIB // 4096, got
    # Parked: nothing serves this VM any more, and closing swaps nothing in.
    refused = vmm.call("status")
    assert not refused["ok"] and "parked" in refused["message"], refused
    vmm.ok("close")


def test_park_reads_staging(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _filled(make_vmm, swap_dir)
    vmm.ok("enable")   # Pending: every written page in staging
    got = _park(vmm, model)
    assert got["ok"] and got["image"]["mismatched_pages"] == 0, got
    assert got["bytes"]["staging"] >= 4 * MIB and got["bytes"]["swap_file"] == 0, got
    assert got["memfds_only"]["mismatched_pages"] >= 4 * MIB // 4096, got
    vmm.ok("close")


def test_a_called_off_park_leaves_the_vm_served_where_it_was(
        make_vmm: Callable[..., TestVmm], swap_dir: Path) -> None:
    vmm, model = _filled(make_vmm, swap_dir)
    vmm.ok("enable")
    vmm.ok("out")
    failed = _park(vmm, model, fail=True)
    assert not failed["ok"] and "store went away" in failed["message"], failed
    status = vmm.ok("status")["status"]
    assert status["state"] == "Active" and status["restarts"] == 1, status
    model.verify()   # every page served by the successor from where it lay
    # And a park after it works as the first would have.
    vmm.ok("enable")
    got = _park(vmm, model)
    assert got["ok"] and got["image"]["mismatched_pages"] == 0, got
    vmm.ok("close")


def test_detach_is_refused_on_the_public_socket() -> None:
    with pytest.raises(ProtocolError, match="detach"):
        decode_request(b'{"command": "detach"}', 0, public=True)
