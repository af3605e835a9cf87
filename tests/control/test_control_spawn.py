"""Starting a monitor must not wait for a device process forked meanwhile (monitor_process.py).

A device forked while the controller starts a monitor gets a copy of every descriptor the VMM
has at that instant; with ``subprocess.Popen`` that includes the pipe through which Popen waits
for the child's ``exec``, and Popen then returns only when the device exits. Here a thread forks
"devices" that live for 10 s as fast as it can while the main thread starts 100 children:
every start must return before any device exits. The negative control runs the same race
with Popen and must see it stall.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from vmmswap.control.monitor_process import MonitorProcess

pytestmark = pytest.mark.timeout(120)
DEVICE_LIFE = 10.0
STARTS = 100


def _race(start: Callable[[], object]) -> float:
    """The longest of STARTS ``start()`` calls while devices are forked; kills the devices."""
    stop = threading.Event()
    devices: list[int] = []

    def fork_devices() -> None:
        while not stop.is_set():
            pid = os.fork()
            if pid == 0:
                time.sleep(DEVICE_LIFE)  # a device: never execs, holds what it inherited
                os._exit(0)
            devices.append(pid)
            time.sleep(0.0005)

    forker = threading.Thread(target=fork_devices)
    forker.start()
    worst = 0.0
    try:
        for _ in range(STARTS):
            began = time.monotonic()
            start()
            worst = max(worst, time.monotonic() - began)
            if worst > DEVICE_LIFE / 2:
                break
    finally:
        stop.set()
        forker.join()
        for pid in devices:
            os.kill(pid, signal.SIGKILL)
        for pid in devices:
            os.waitpid(pid, 0)
    return worst


def test_a_device_forked_meanwhile_does_not_hold_up_a_spawn() -> None:
    r, w = os.pipe()  # close-on-exec, as every descriptor of the VMM

    def spawn() -> None:
        MonitorProcess.spawn([sys.executable, "-c", "pass"], os.environ, pass_fd=w,
                             target_fd=3).wait()

    try:
        assert _race(spawn) < DEVICE_LIFE / 2
    finally:
        os.close(r)
        os.close(w)


def test_negative_control_popen_waits_for_the_device() -> None:
    """With Popen the same race stalls a start until a device exits."""
    def popen() -> None:
        subprocess.Popen([sys.executable, "-c", "pass"], close_fds=True,
                         start_new_session=True).wait()

    assert _race(popen) > DEVICE_LIFE / 2
