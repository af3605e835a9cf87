"""Review (regression): a blocking device uffd must not hang the monitor.

``Monitor._register_process`` checked only that the descriptor is a userfaultfd. A uffd created
without O_NONBLOCK (any process of the same user can connect to the control socket and send
one) is reported by poll/epoll as EPOLLERR at all times (fs/userfaultfd.c: "poll() never
guarantees that read won't block"), so the monitor's level-triggered epoll calls
``UffdSet.drain`` at once, and ``read(2)`` on the blocking descriptor waits forever: the
single-threaded monitor stops serving every fault of every process and every command. Found in
review; fixed in the working tree meanwhile (monitor.py sets O_NONBLOCK on receipt); this test
keeps it fixed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from control_helpers import (
    FAKE_FACTORY,
    TestVmm,
    VmmTimeoutError,
    wait_gone,
)

from vmmswap.control.protocol import Command, Request, request
from vmmswap.uffd.userfaultfd import VMM_SWAP_FEATURES, Userfaultfd

pytestmark = pytest.mark.timeout(90)


def test_blocking_device_uffd_does_not_hang_the_monitor(tmp_path: Path) -> None:
    swap_dir = tmp_path / "swap"
    swap_dir.mkdir()
    ctl = swap_dir / "ctl.sock"
    vmm = TestVmm(env={"VMMSWAP_TEST_HANDLER_FACTORY": FAKE_FACTORY})
    uffd = Userfaultfd.new(VMM_SWAP_FEATURES, nonblocking=False)
    pidfd = os.pidfd_open(os.getpid())
    try:
        vmm.launch(swap_dir, control_socket=ctl)
        # State Ready: nothing is registered on this process's uffd, so nothing here can fault.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(20)
            sock.connect(str(ctl))
            response = request(sock, Request(Command.REGISTER_PROCESS),
                               [uffd.fileno(), pidfd])
        # The monitor takes it and makes it non-blocking (O_NONBLOCK lives in the open file
        # description, which this process shares); a refusal here would hide the hang case.
        assert response.ok, response.message
        assert not os.get_blocking(uffd.fileno())
        try:
            vmm.call("status", timeout=5)
        except VmmTimeoutError:
            pytest.fail("the monitor stopped answering after a blocking uffd was registered")
    finally:
        os.close(pidfd)
        monitor = vmm.monitor_pid
        vmm.kill()
        if monitor:
            wait_gone(monitor, 2, kill=True)
        uffd.close()
