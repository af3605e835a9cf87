"""The public control socket: permissions, peer check, and a fuzz of malformed messages."""

from __future__ import annotations

import array
import json
import os
import random
import select
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_helpers import FAKE_FACTORY, MIB, Model, TestVmm

from vmmswap.control.control_socket import MIN_IDLE_TO_EVICT
from vmmswap.control.monitor_clients import MAX_CLIENTS
from vmmswap.control.protocol import MAX_MESSAGE, Command, Request, decode_response, request

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def running() -> Iterator[tuple[TestVmm, Path, Model]]:
    # Not under pytest's 0700 tmp_path: the other-uid test must be able to reach the socket.
    base = Path(tempfile.mkdtemp(prefix="vmmswap-ctl-"))
    vmm = TestVmm(env={"VMMSWAP_TEST_HANDLER_FACTORY": FAKE_FACTORY})
    sock = base / "ctl.sock"
    try:
        vmm.launch(base, control_socket=sock)
        model = Model(vmm)
        model.write(0, 0, 1 * MIB, seed=1)
        yield vmm, sock, model
    finally:
        vmm.close()
        shutil.rmtree(base, ignore_errors=True)


def _connect(path: Path) -> socket.socket:
    for _ in range(500):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        try:
            s.connect(str(path))
        except BlockingIOError:  # the listen backlog is full for a moment
            s.close()
            time.sleep(0.01)
            continue
        return s
    raise TimeoutError("cannot connect")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_socket_is_private(running: tuple[TestVmm, Path, Model]) -> None:
    _, sock, _ = running
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_other_uid_is_refused(running: tuple[TestVmm, Path, Model]) -> None:
    vmm, sock, _ = running
    os.chmod(sock, 0o666)  # get past the file mode: the SO_PEERCRED check must still refuse
    os.chmod(sock.parent, 0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect(str(sock))
            s.send(b'{"command":"enable"}')
            os.write(w, s.recv(MAX_MESSAGE))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    response = decode_response(data)
    assert not response.ok and response.error == "permission" and "uid 65534" in response.message
    assert vmm.ok("status")["status"]["state"] == "Ready"


def _malformed(rng: random.Random, i: int) -> tuple[bytes, int]:
    """(message, number of pipe descriptors to attach) -- never a valid request."""
    kind = i % 10
    if kind == 0:
        return rng.randbytes(rng.randint(1, 200)), 0
    if kind == 1:
        return json.dumps(rng.choice([[], 1, "enable", None, 1.5, {"cmd": "x"}])).encode(), 0
    if kind == 2:
        return json.dumps({"command": rng.choice(["Enable", "swap", "", "exit", "init",
                                                  "attach", "ENABLE"])}).encode(), 0
    if kind == 3:
        return json.dumps({"command": "status", rng.choice("abcxyz"): 1}).encode(), 0
    if kind == 4:
        return json.dumps({"command": "disable", "slow_file_cleanup": rng.choice(
            [1, "yes", None, [], {}])}).encode(), 0
    if kind == 5:
        return b"x" * rng.choice([MAX_MESSAGE + 1, MAX_MESSAGE * 2, 200_000]), 0
    if kind == 6:
        return json.dumps({"command": "status", "version": rng.choice([0, 2, "1", 1.0e9,
                                                                      True])}).encode(), 0
    if kind == 7:  # descriptors where none belong, or the wrong ones for register_process
        return json.dumps({"command": rng.choice(["status", "register_process",
                                                  "enable"])}).encode(), rng.choice([1, 2, 3])
    if kind == 8:
        return b"{" * rng.randint(1, 5000) + b"}" * rng.randint(0, 5000), 0
    valid = json.dumps({"command": "status"}).encode()
    pos = rng.randrange(len(valid))
    return valid[:pos] + bytes([rng.randrange(256)]) + valid[pos + 1:], 0


def test_fuzz_control_socket(running: tuple[TestVmm, Path, Model]) -> None:
    vmm, sock, model = running
    vmm.ok("enable")  # the monitor serves faults throughout
    rng = random.Random(1234)
    before = _fd_count(vmm.monitor_pid)
    conn = _connect(sock)
    refused = 0
    for i in range(1500):
        data, nfds = _malformed(rng, i)
        pipes = [os.pipe() for _ in range(nfds)]
        fds = [r for r, _ in pipes]
        try:
            if fds:
                conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", fds).tobytes())])
            else:
                conn.send(data)
            reply = conn.recv(MAX_MESSAGE)
        except OSError:
            conn.close()
            conn = _connect(sock)
            continue
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)
        response = decode_response(reply)
        if response.ok:
            # a corrupted byte can still spell a valid status request
            assert response.status is not None
        else:
            refused += 1
            assert response.error in ("request", "permission"), response
        if i % 100 == 99:  # new connections mid-way
            conn.close()
            conn = _connect(sock)
    conn.close()
    assert refused >= 1000
    # Still serving: commands work, faults are served, no descriptor leaked.
    with _connect(sock) as s:
        assert request(s, Request(Command.STATUS)).status is not None
        assert request(s, Request(Command.OUT)).ok
    model.verify()
    assert vmm.ok("status")["status"]["state"] in ("SwapOutInProgress", "Active")
    assert _fd_count(vmm.monitor_pid) <= before + 1


def test_many_clients_are_capped(running: tuple[TestVmm, Path, Model]) -> None:
    vmm, sock, _ = running
    conns = [_connect(sock) for _ in range(40)]
    try:
        answers = [request(c, Request(Command.STATUS)) for c in conns]
        assert any(a.ok for a in answers)
        assert any(a.error == "busy" for a in answers)
    finally:
        for c in conns:
            c.close()
    assert vmm.ok("status")["ok"]


def test_idle_connections_cannot_lock_the_user_out(running: tuple[TestVmm, Path, Model]) -> None:
    vmm, sock, _ = running
    idle = [_connect(sock) for _ in range(MAX_CLIENTS - 1)]  # + the controller's: all slots
    try:
        with _connect(sock) as late:
            assert request(late, Request(Command.STATUS)).error == "busy"
        time.sleep(MIN_IDLE_TO_EVICT + 0.5)
        with _connect(sock) as late:
            assert request(late, Request(Command.STATUS)).ok  # the idlest made room
        evicted = [c for c in idle if select.select([c], [], [], 0)[0]]
        assert len(evicted) == 1
        assert decode_response(evicted[0].recv(MAX_MESSAGE)).error == "busy"
    finally:
        for c in idle:
            c.close()
    assert vmm.ok("status")["ok"]


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()
    vmm = TestVmm(env={"VMMSWAP_TEST_HANDLER_FACTORY": FAKE_FACTORY})
    try:
        vmm.launch(tmp_path, control_socket=path)
        with _connect(path) as s:
            assert request(s, Request(Command.STATUS)).ok
        other = TestVmm(env={"VMMSWAP_TEST_HANDLER_FACTORY": FAKE_FACTORY})
        try:
            result = other.call("launch", swap_dir=str(tmp_path), control_socket=str(path))
            assert not result["ok"] and "in use" in result["message"]
        finally:
            other.close()
    finally:
        vmm.close()
    assert not path.exists()
