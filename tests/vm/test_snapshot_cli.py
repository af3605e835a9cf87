"""``vmmswap snapshot`` and ``vmmswap restore`` as a user runs them (subprocesses).

The lazy restores use a real ``vmmswap serve-snapshot``: started by ``restore --serve``, or
started separately and named with ``--handler-socket`` (how a Firecracker user would run it).
Negative controls: a corrupted memory file makes ``restore`` exit 1 naming the failed check; a
damaged state file is refused before anything runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vm_helpers import KVM_REASON

from vmmswap.vm.snapshot import MEMORY_FILE, STATE_FILE

pytestmark = [pytest.mark.timeout(240), pytest.mark.kvm]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmmswap", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if KVM_REASON is not None:
        pytest.skip(f"needs a usable /dev/kvm: {KVM_REASON}")
    out = tmp_path_factory.mktemp("cli") / "snap"
    done = _run("snapshot", str(out), "--memory", "64", "--vcpus", "2")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["checksums"] == 31 and summary["data_bytes"] < 40 << 20
    return out


def test_restore_serve(snap: Path) -> None:
    done = _run("restore", str(snap), "--serve")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] and out["handler"]["pages_on_demand"] > 0 and out["first_exit_ms"] > 0


def test_restore_through_a_separate_handler(snap: Path, tmp_path: Path) -> None:
    sock = tmp_path / "h.sock"
    handler = subprocess.Popen([sys.executable, "-m", "vmmswap", "serve-snapshot", "--socket",
                                str(sock), "--mem-file", str(snap / MEMORY_FILE)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert handler.stdout is not None and "listening" in handler.stdout.readline()
        done = _run("restore", str(snap), "--handler-socket", str(sock))
        assert done.returncode == 0, done.stderr
        out, _err = handler.communicate(timeout=30)
    finally:
        handler.kill()
    assert handler.returncode == 0  # it exited on its own when the VMM closed the socket
    assert json.loads(out.splitlines()[-1])["faults"] > 0


def test_restore_eager(snap: Path) -> None:
    done = _run("restore", str(snap), "--eager")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"]


def test_corrupt_memory_fails_restore_check(snap: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / STATE_FILE).write_bytes((snap / STATE_FILE).read_bytes())
    data = bytearray((snap / MEMORY_FILE).read_bytes())
    fill_offset = json.loads((snap / STATE_FILE).read_text())["state"]["guest"]["fills"][0][0]
    pos = (2 << 20) + fill_offset + 4096 * 3  # region 0's data area starts at 2 MiB
    data[pos] ^= 1
    (bad / MEMORY_FILE).write_bytes(bytes(data))
    done = _run("restore", str(bad), "--serve")
    assert done.returncode == 1
    assert "check failed" in done.stderr and "1 of 31 checksums differ" in done.stderr


def test_damaged_state_file_is_refused(snap: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (snap / STATE_FILE).read_text().replace('"mp_state": 0', '"mp_state": 3', 1)
    (bad / STATE_FILE).write_text(text)
    done = _run("restore", str(bad), "--eager", timeout=60)
    assert done.returncode == 1 and "SHA-256 does not match" in done.stderr


def test_restore_usage() -> None:
    done = _run("restore", "/nonexistent", "--eager", "--serve", timeout=60)
    assert done.returncode == 2 and "not allowed" in done.stderr
    done = _run("restore", "/nonexistent", "--eager", timeout=60)
    assert done.returncode == 1 and "cannot read state file" in done.stderr


def test_working_set_recorded_then_prefetched(snap: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws.npy"
    first = _run("restore", str(snap), "--serve", "--record-working-set", str(ws))
    assert first.returncode == 0, first.stderr
    assert ws.exists()
    second = _run("restore", str(snap), "--serve", "--working-set", str(ws))
    assert second.returncode == 0, second.stderr
    a, b = json.loads(first.stdout)["handler"], json.loads(second.stdout)["handler"]
    assert a["pages_prefetched"] == 0 and b["pages_prefetched"] > 0
    assert b["faults"] < a["faults"]
    assert json.loads(second.stdout)["ok"]  # prefetched pages are the right ones


def test_diff_snapshot_through_the_cli(snap: Path, tmp_path: Path) -> None:
    diff = tmp_path / "diff"
    done = _run("restore", str(snap), "--serve", "--diff-snapshot", str(diff))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["diff"]["data_bytes"] < 16 << 20
    again = _run("restore", str(diff), "--serve")
    assert again.returncode == 0, again.stderr
    assert "9 pattern fills verified" in json.loads(again.stdout)["check"]
    chained = _run("restore", str(diff), "--serve", "--diff-snapshot", str(tmp_path / "d2"))
    assert chained.returncode == 1 and "not supported" in chained.stderr
