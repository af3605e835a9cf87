"""``vmmswap park SOCKET URL`` against a VM that ``vmmswap run`` keeps running under vmm-swap.

The user's flow, each step a process of its own: run the VM, swap it out through the monitor's
control socket, park it through the VMM's socket (its memory read where it lies, straight from
the swap file), resume it from the store elsewhere with the guest verifying every checksum.
A park whose store refuses every chunk leaves the VM running where it was: it is then stopped
with SIGTERM and its guest still verifies every checksum. The VMM socket refuses another uid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vmmswap.vm.vmm_socket import VmmSocket, VmmSocketError, park_request

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm"),
              pytest.mark.timeout(300)]
TIMEOUT = 120


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmmswap.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def _run_vm(tmp: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    vmm, swap = tmp / "vm.sock", tmp / "swap.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmswap.cli", "run", "--vmm-socket", str(vmm),
         "--control-socket", str(swap), "--memory", "64", "--vcpus", "2",
         "--swap-dir", str(tmp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    assert json.loads(line)["running"] is True
    for command in ("enable", "out"):
        done = _cli(command, str(swap))
        assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + TIMEOUT
    while json.loads(_cli("status", str(swap)).stdout)["state"] != "Active":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, vmm, swap


def _finish(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return dict(json.loads(out.splitlines()[-1]))


def test_run_swap_out_park_through_the_vmm_socket_resume(tmp_path: Path) -> None:
    proc, vmm, _swap = _run_vm(tmp_path)
    try:
        store = tmp_path / "store"
        parked = _cli("park", str(vmm), str(store))
        assert parked.returncode == 0, parked.stderr
        up = json.loads(parked.stdout.splitlines()[-1])
        assert up["state_before"] == "Active" and up["resident_pages_before"] == 0, up
        assert up["read_from"]["swap_file"] >= 32 << 20 and up["read_from"]["staging"] == 0, up
        final = _finish(proc)
        assert final["parked"] == up
        assert not vmm.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = _cli("resume", str(store), "--cache-dir", str(tmp_path / "cache"))
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout.splitlines()[-1])
    assert out["ok"] is True and out["handler"]["source_hash_failures"] == 0, out


def test_a_failed_park_leaves_the_vm_running_and_stoppable(tmp_path: Path) -> None:
    proc, vmm, swap = _run_vm(tmp_path)
    try:
        store = tmp_path / "store"
        store.mkdir()
        (store / "chunks").write_text("the pool is a file: every chunk's PUT fails")
        failed = _cli("park", str(vmm), str(store))
        assert failed.returncode == 1, failed.stdout
        assert "runs on where it was" in failed.stderr, failed.stderr
        assert not (store / "manifest.json").exists()
        status = json.loads(_cli("status", str(swap)).stdout)
        assert status["state"] == "Active" and status["restarts"] == 1, status
        proc.send_signal(signal.SIGTERM)
        final = _finish(proc)
        assert final["stopped"] is True and final["ok"] is True, final
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_vmm_socket_refuses_another_uid(tmp_path: Path) -> None:
    """Only the VMM's uid may park it: the socket is 0600, and even made world-writable it
    refuses a peer of another uid (SO_PEERCRED) without calling the park."""
    calls: list[str] = []

    def park(url: str) -> dict[str, object]:
        calls.append(url)
        return {}

    # A directory the other uid can reach (pytest's own are 0700).
    home = Path(tempfile.mkdtemp(prefix="vmmswap-vmm-socket-", dir="/tmp"))
    os.chmod(home, 0o755)
    path = str(home / "vm.sock")
    server = VmmSocket(path, park)
    try:
        assert (os.stat(path).st_mode & 0o777) == 0o600
        for mode, want in ((0o600, "cannot connect"), (0o666, "refused")):
            os.chmod(path, mode)
            pid = os.fork()
            if pid == 0:   # the child drops to uid 65534 and asks
                code = 4
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    answer = park_request(path, "x", timeout=10)
                    code = 1 if answer.get("ok") else 2
                except VmmSocketError:
                    code = 3
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            got = {1: "parked", 2: "refused", 3: "cannot connect"}.get(
                os.waitstatus_to_exitcode(status), "child failed")
            assert got == want, (mode, got)
        assert calls == []
        assert park_request(path, "u")["ok"] is True and calls == ["u"]
    finally:
        server.close()
        shutil.rmtree(home, ignore_errors=True)
