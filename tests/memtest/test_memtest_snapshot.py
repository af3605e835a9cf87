"""memtest86+ snapshotted mid-pass and restored lazily through Firecracker's handshake must
finish that pass with zero errors (issue 14). memtest is the independent oracle: it checks
every location of its range against the pattern it wrote before the snapshot. Negative
control: the same snapshot with memtest's range corrupted in the memory file -> memtest
reports errors, so its zero means the restored memory is right.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmswap.vm.kvm import kvm_unavailable_reason
from vmmswap.vm.memtest.guest import MemtestGuest
from vmmswap.vm.memtest.image import find_image
from vmmswap.vm.memtest.screen import MemtestStatus
from vmmswap.vm.memtest.session import Selection, configure, current_status, wait_for_pass
from vmmswap.vm.memtest.snapshot import RestoredMemtest, snapshot_memtest
from vmmswap.vm.restore import handler_stats, start_handler
from vmmswap.vm.snapshot import MEMORY_FILE, STATE_FILE
from vmmswap.vm.vm_state import load_state

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

#: Test #5 (moving inversions, random pattern) over 64 KiB at 4 MiB, as the CI swap test.
SELECTION = Selection(lower_page=1024, upper_page=1040)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, MemtestStatus]]:
    """memtest after one clean pass, snapshotted ~40 % into its second; (dir, status then)."""
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs a usable /dev/kvm: {reason}")
    try:
        image = find_image()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("memtest") / "snap"
    with MemtestGuest(image) as guest:
        guest.start()
        configure(guest, SELECTION)
        started = time.monotonic()
        assert wait_for_pass(guest, 1, 200).errors == 0
        time.sleep((time.monotonic() - started) * 0.4)
        snapshot_memtest(guest, out)
        status = current_status(guest)
    yield out, status


def _restore(snap: Path, mem_file: Path, tmp: Path) -> tuple[MemtestStatus, dict[str, object]]:
    sock = str(tmp / "h.sock")
    child = start_handler(str(mem_file), sock)
    try:
        restored = RestoredMemtest(load_state(str(snap / STATE_FILE)), handler_socket=sock)
    except BaseException:
        child.kill()
        raise
    with restored:
        start = current_status(restored)  # the screen carried over from before the snapshot
        restored.start()
        after = wait_for_pass(restored, start.passes + 1, 200)
    return after, handler_stats(child)


@pytest.mark.timeout(400)
def test_memtest_restored_mid_pass_finishes_without_errors(
        snapshot: tuple[Path, MemtestStatus], tmp_path: Path) -> None:
    snap, before = snapshot
    after, stats = _restore(snap, snap / MEMORY_FILE, tmp_path)
    assert after.passes == before.passes + 1 and after.errors == 0
    assert isinstance(stats["faults"], int) and stats["faults"] > 0  # memory came lazily


@pytest.mark.timeout(400)
def test_memtest_sees_a_corrupted_restore(snapshot: tuple[Path, MemtestStatus],
                                          tmp_path: Path) -> None:
    """Negative control: one bit flipped in every page of memtest's range in the file."""
    snap, _before = snapshot
    data = bytearray((snap / MEMORY_FILE).read_bytes())
    lower, upper = SELECTION.range_bytes
    for page in range(lower, upper, 4096):
        data[page + 1000] ^= 0x10
    bad = tmp_path / "memory"
    bad.write_bytes(bytes(data))
    after, _stats = _restore(snap, bad, tmp_path)
    assert after.errors > 0
