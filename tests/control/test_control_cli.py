"""The ``vmmswap`` command line against a running monitor: output, progress and exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from control_helpers import MIB, SRC, Model, TestVmm

from vmmswap import cli
from vmmswap.control.protocol import Command
from vmmswap.control.status import SwapMetrics, SwapState, SwapStateTransition, SwapStatus

pytestmark = pytest.mark.timeout(120)


def vmmswap(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get(
        "PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "vmmswap", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


@pytest.fixture
def vm(make_vmm: Callable[..., TestVmm], swap_dir: Path) -> tuple[TestVmm, str, Model]:
    vmm = make_vmm()
    sock = str(swap_dir / "vm.sock")
    vmm.launch(swap_dir, control_socket=sock)
    model = Model(vmm)
    model.write(0, 0, 2 * MIB, seed=1)
    model.write(1, 0, 1 * MIB, seed=2)
    return vmm, sock, model


def test_cli_session(vm: tuple[TestVmm, str, Model]) -> None:
    _, sock, model = vm
    result = vmmswap("status", sock)
    assert result.returncode == 0, result.stderr
    status = SwapStatus.from_json(result.stdout)
    assert str(status.state) == "Ready"
    assert list(json.loads(result.stdout))[:3] == ["state", "metrics", "state_transition"]

    result = vmmswap("enable", sock)
    assert result.returncode == 0, result.stderr
    assert "768 pages" in result.stdout and "moved to staging" in result.stdout

    result = vmmswap("out", "--wait", sock)
    assert result.returncode == 0, result.stderr
    assert "out: 768 pages written" in result.stdout

    result = vmmswap("trim", sock)  # wrong state: a clear error, exit code 1
    assert result.returncode == cli.EXIT_FAILED
    assert "needs state Pending" in result.stderr and "state Active" in result.stderr

    model.verify()
    result = vmmswap("disable", "--slow-file-cleanup", "--wait", sock)
    assert result.returncode == 0, result.stderr
    assert "swapped in" in result.stdout
    assert str(SwapStatus.from_json(vmmswap("status", sock).stdout).state) == "Ready"
    model.verify()


def test_cli_watch_prints_a_table(vm: tuple[TestVmm, str, Model]) -> None:
    _, sock, _ = vm
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "vmmswap", "status", "--watch", "0.1", sock],
                            stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert "state" in out and "Ready" in out and "swap file" in out


def test_cli_exit_codes(tmp_path: Path) -> None:
    assert vmmswap("status", str(tmp_path / "nope.sock")).returncode == cli.EXIT_UNREACHABLE
    assert vmmswap("frobnicate", "x").returncode == cli.EXIT_USAGE
    assert vmmswap("status").returncode == cli.EXIT_USAGE
    assert vmmswap("--help").returncode == 0


def test_cli_gives_up_on_a_monitor_that_does_not_answer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "stuck.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(path)
        server.listen(1)  # accepted by the kernel, never answered
        started = time.monotonic()
        code = cli.main(["status", "--timeout", "0.3", path])
        elapsed = time.monotonic() - started
    assert code == cli.EXIT_UNREACHABLE
    assert "did not answer within 0.3 s" in capsys.readouterr().err
    assert elapsed < 30


def test_cli_demo_missing_module(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    def missing(name: str) -> object:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    assert cli.main(["demo", "--linux"]) == cli.EXIT_USAGE
    assert "vmmswap.vm.linux.demo is not available" in capsys.readouterr().err


def test_cli_demo_dispatches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str]]] = []

    class Module:
        def __init__(self, name: str) -> None:
            self.name = name

        def main(self, argv: list[str]) -> int:
            calls.append((self.name, argv))
            return 0

    monkeypatch.setattr(cli.importlib, "import_module", Module)
    assert cli.main(["demo", "--fill", "8"]) == 0
    assert cli.main(["demo", "--linux", "--x"]) == 0
    assert cli.main(["demo", "--guest", "memtest86+", "--cycles", "1"]) == 0
    assert cli.main(["demo", "--guest=linux"]) == 0
    assert calls == [("vmmswap.vm.demo", ["--fill", "8"]), ("vmmswap.vm.linux.demo", ["--x"]),
                     ("vmmswap.vm.memtest.demo", ["--cycles", "1"]),
                     ("vmmswap.vm.linux.demo", [])]


def test_cli_demo_unknown_guest(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--guest", "dos"]) == cli.EXIT_USAGE
    assert "unknown --guest 'dos'" in capsys.readouterr().err


def test_progress_line() -> None:
    status = SwapStatus(SwapState.SWAP_OUT_IN_PROGRESS, SwapMetrics(staging_pages=300),
                        SwapStateTransition(100, 1500))
    line = cli.progress_line(Command.OUT, status)
    assert "100 pages written" in line and "300 left" in line and "25.0%" in line
