"""What the monitor process holds: every descriptor close-on-exec, and the swap file it really
uses (the one the controller creates for it, not only what ``SwapFile.create`` makes in a unit
test) nameless and mode 0600.

Nothing is enabled here, so no guest memory is registered and this process never faults.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmswap.control.controller import SwapController
from vmmswap.dataplane.guest_memory import GuestMemory

MiB = 1 << 20
O_CLOEXEC = 0o2000000  # fdinfo's "flags" field is octal


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    swap_dir = tmp_path / "swap"
    swap_dir.mkdir()
    memory = GuestMemory.create([(0, 4 * MiB), (8 * MiB, 4 * MiB)], name="fd-check")
    ctl = SwapController.launch(memory, str(swap_dir), on_monitor_died=None)
    try:
        ctl.status()  # the monitor is up and has taken every descriptor it was sent
        yield ctl.monitor_pid, swap_dir
    finally:
        ctl.close()
        memory.close()


def descriptors(pid: int) -> dict[int, tuple[str, int]]:
    """fd -> (link target, fdinfo flags) of process ``pid``."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f
                             if line.startswith("flags:"))
        except (FileNotFoundError, StopIteration):
            continue  # closed while we looked
        out[fd] = (target, flags)
    return out


def test_every_monitor_descriptor_is_close_on_exec(monitor: tuple[int, Path]) -> None:
    pid, _ = monitor
    fds = descriptors(pid)
    assert len(fds) > 5  # uffd, swap file, memfds, sockets, epoll at least
    leaky = {fd: target for fd, (target, flags) in fds.items()
             if fd > 2 and not flags & O_CLOEXEC}
    assert leaky == {}


def test_the_monitors_swap_file_is_nameless_and_0600(monitor: tuple[int, Path]) -> None:
    pid, swap_dir = monitor
    swap = [fd for fd, (target, _) in descriptors(pid).items()
            if target.startswith(str(swap_dir) + "/")]
    assert len(swap) == 1, descriptors(pid)
    target = os.readlink(f"/proc/{pid}/fd/{swap[0]}")
    assert target.endswith("(deleted)")  # O_TMPFILE: it never had a name
    assert os.listdir(swap_dir) == []
    st = os.stat(f"/proc/{pid}/fd/{swap[0]}")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_the_flag_check_can_fail() -> None:
    """Negative control: a descriptor opened without O_CLOEXEC is seen as such."""
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        os.set_inheritable(fd, True)
        assert not descriptors(os.getpid())[fd][1] & O_CLOEXEC
    finally:
        os.close(fd)
