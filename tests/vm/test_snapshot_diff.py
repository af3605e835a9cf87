"""Diff snapshots: after a lazy restore, a second snapshot holds only the pages that changed
since (written, or given back through the balloon), as a full-size sparse memory file that
``serve-snapshot --overlay`` lays over the base. The restored diff is judged by the guest's
checksums; the negative control restores the diff's state over the base alone, and the
guest must find exactly the changed chunks wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vm_helpers import KVM_REASON, MIB

from vmmswap.snapshot.working_set import load_working_set
from vmmswap.vm.guest_build import GuestProgram
from vmmswap.vm.micro import MicroVM
from vmmswap.vm.restore import RestoredVM, handler_stats, memory_files, start_handler
from vmmswap.vm.snapshot import DIFF_FILE, DIFF_PAGES_FILE, STATE_FILE, snapshot_micro_vm
from vmmswap.vm.snapshot_check import change_guest, check_guest, prepare_guest
from vmmswap.vm.vm_state import load_state

pytestmark = [pytest.mark.timeout(180), pytest.mark.kvm]


@pytest.fixture(scope="module")
def snaps(tmp_path_factory: pytest.TempPathFactory,
          guest_program: GuestProgram) -> tuple[Path, Path, dict[str, object]]:
    """(base snapshot, diff snapshot, what changed between them)."""
    if KVM_REASON is not None:
        pytest.skip(f"needs a usable /dev/kvm: {KVM_REASON}")
    tmp = tmp_path_factory.mktemp("diff")
    base, diff = tmp / "base", tmp / "diff"
    with MicroVM(64 * MIB, vcpus=2, regions=2, program=guest_program) as vm:
        vm.start()
        snapshot_micro_vm(vm, base, guest=prepare_guest(vm.workload))
        vm.shutdown()
    state = load_state(str(base / STATE_FILE))
    child = start_handler(memory_files(str(base), state)[0], str(tmp / "h.sock"))
    with RestoredVM(state, handler_socket=str(tmp / "h.sock"), dirty_log=True) as vm:
        vm.start()
        assert check_guest(vm.workload, state.guest).ok
        # Give back the first half of fill 2 (non-zero in the base): zeros in the diff.
        off, length, seed = state.guest["fills"][2]
        vm.workload.balloon(off, length // 2)
        guest = dict(state.guest)
        fills = [f for i, f in enumerate(guest["fills"]) if i != 2]
        guest["fills"] = [*fills, [off, length // 2, 0], [off + length // 2, length // 2, seed]]
        guest = change_guest(vm.workload, guest)
        info = snapshot_micro_vm(vm, diff, guest=guest, diff=vm.written_pages(), base=str(base))
        vm.shutdown()
    handler_stats(child)
    changed = {"ballooned": (off, length // 2), "rewritten": tuple(state.guest["fills"][1]),
               "gap": tuple(guest["fills"][-1][:2]), "diff_bytes": info.data_bytes,
               "base_checksums": state.guest["checksums"], "diff_checksums": guest["checksums"]}
    return base, diff, changed


def test_diff_holds_only_what_changed(snaps: tuple[Path, Path, dict[str, object]]) -> None:
    base, diff, changed = snaps
    state = load_state(str(diff / STATE_FILE))
    assert state.guest["base"] == str(base.resolve())
    pages = load_working_set(str(diff / DIFF_PAGES_FILE))
    rewritten, gap, ballooned = changed["rewritten"], changed["gap"], changed["ballooned"]
    assert isinstance(rewritten, tuple) and isinstance(gap, tuple)
    assert isinstance(ballooned, tuple)
    # Data pages changed: the rewrite, the new fill and the balloon (+ a few stack/bss pages).
    want = (rewritten[1] + gap[1] + ballooned[1]) // 4096
    assert want <= len(pages) <= want + 64
    assert changed["diff_bytes"] == pytest.approx((rewritten[1] + gap[1]), abs=64 * 4096)
    assert (diff / DIFF_FILE).stat().st_size == state.memory_size


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
def test_diff_restores_and_the_guest_verifies_it(snaps: tuple[Path, Path, dict[str, object]],
                                                 tmp_path: Path, eager: bool) -> None:
    _base, diff, _changed = snaps
    state = load_state(str(diff / STATE_FILE))
    mem, overlay, pages = memory_files(str(diff), state)
    child = None
    if eager:
        vm = RestoredVM(state, mem_file=mem, overlay=overlay, overlay_pages=pages)
    else:
        child = start_handler(mem, str(tmp_path / "h.sock"), overlay=overlay,
                              overlay_pages=pages)
        vm = RestoredVM(state, handler_socket=str(tmp_path / "h.sock"))
    with vm:
        vm.start()
        result = check_guest(vm.workload, state.guest)
        vm.shutdown()
    if child is not None:
        handler_stats(child)
    assert result.ok, result.describe()


def test_negative_control_diff_state_over_the_base_alone(
        snaps: tuple[Path, Path, dict[str, object]], tmp_path: Path) -> None:
    base, diff, changed = snaps
    state = load_state(str(diff / STATE_FILE))
    child = start_handler(memory_files(str(diff), state)[0], str(tmp_path / "h.sock"))
    with RestoredVM(state, handler_socket=str(tmp_path / "h.sock")) as vm:
        vm.start()
        result = check_guest(vm.workload, state.guest)
        vm.shutdown()
    handler_stats(child)
    assert not result.ok
    base_sums, diff_sums = changed["base_checksums"], changed["diff_checksums"]
    assert isinstance(base_sums, list) and isinstance(diff_sums, list)
    differing = [i for i, (a, b) in enumerate(zip(base_sums, diff_sums, strict=True)) if a != b]
    assert result.bad_chunks == differing and len(differing) >= 3
    assert state.guest["base"] == str(base.resolve())
