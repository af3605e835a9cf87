"""Creating a uffd and the UFFDIO_API handshake (selftest ``UFFDIO_API (with syscall|dev)``)."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from uffd_helpers import run_in_child

from vmmswap.kernel import libc
from vmmswap.kernel import uffd as abi
from vmmswap.kernel.uffd import Feature, Ioctls
from vmmswap.uffd.errors import UffdPermissionError
from vmmswap.uffd.userfaultfd import (
    CREATED_BY_DEVICE,
    CREATED_BY_SYSCALL,
    VMM_SWAP_FEATURES,
    KernelSupport,
    Userfaultfd,
)

UFFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | abi.UFFD_USER_MODE_ONLY
NOBODY = 65534
T = TypeVar("T")


def open_sys(flags: int) -> int:
    return libc.syscall(libc.syscall_number("userfaultfd"), flags)


def open_dev(flags: int) -> int:
    try:
        dev = os.open(abi.USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        pytest.skip(f"cannot open {abi.USERFAULTFD_DEVICE}: {err.strerror}")
    try:
        return fcntl.ioctl(dev, abi.USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)


def api(fd: int, api_version: int, features: int) -> tuple[int, int, int]:
    buf = bytearray(abi.UFFDIO_API_STRUCT.pack(api_version, features, 0))
    fcntl.ioctl(fd, abi.UFFDIO_API_IOCTL, buf)
    return abi.UFFDIO_API_STRUCT.unpack(buf)


@pytest.mark.parametrize("opener", [open_sys, open_dev], ids=["syscall", "dev"])
def test_uffdio_api_port(opener: object) -> None:
    """The selftest, step by step, on raw descriptors from both creation paths."""
    fd = opener(UFFD_FLAGS)  # type: ignore[operator]
    try:
        with pytest.raises(OSError) as wrong_api:
            api(fd, 0xAB, 0)
        assert wrong_api.value.errno == errno.EINVAL
        with pytest.raises(OSError) as wrong_feature:
            api(fd, abi.UFFD_API, 1 << 63)
        assert wrong_feature.value.errno == errno.EINVAL
        _, _, ioctls = api(fd, abi.UFFD_API, 0)
        assert Ioctls(ioctls) & abi.UFFD_API_IOCTLS == abi.UFFD_API_IOCTLS
        with pytest.raises(OSError) as twice:
            api(fd, abi.UFFD_API, 1)
        assert twice.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_failed_handshake_zeroes_the_struct() -> None:
    """Measured quirk: after EINVAL the kernel reports api=0 and features=0."""
    fd = open_sys(UFFD_FLAGS)
    try:
        buf = bytearray(abi.UFFDIO_API_STRUCT.pack(abi.UFFD_API, 1 << 63, 0))
        with pytest.raises(OSError):
            fcntl.ioctl(fd, abi.UFFDIO_API_IOCTL, buf)
        assert abi.UFFDIO_API_STRUCT.unpack(buf)[:2] == (0, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("use_device", [True, False], ids=["dev", "syscall"])
def test_new_handshakes_and_reports_support(use_device: bool) -> None:
    if use_device and not os.path.exists(abi.USERFAULTFD_DEVICE):
        pytest.skip("no /dev/userfaultfd (Linux 6.1+)")
    with Userfaultfd.new(VMM_SWAP_FEATURES, use_device=use_device) as uffd:
        # The parameter is the path that made the descriptor, not only the one asked for.
        assert uffd.created_by == (CREATED_BY_DEVICE if use_device else CREATED_BY_SYSCALL)
        assert uffd.features == VMM_SWAP_FEATURES
        assert VMM_SWAP_FEATURES in uffd.supported_features
        assert abi.UFFD_API_IOCTLS in uffd.api_ioctls
        flags = fcntl.fcntl(uffd.fileno(), fcntl.F_GETFL)
        assert flags & os.O_NONBLOCK
        assert fcntl.fcntl(uffd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with pytest.raises(OSError) as second:
            api(uffd.fileno(), abi.UFFD_API, 0)
        assert second.value.errno == errno.EINVAL


def test_new_options_for_blocking_and_inheritable() -> None:
    with Userfaultfd.new(nonblocking=False, cloexec=False, user_mode_only=True) as uffd:
        assert not fcntl.fcntl(uffd.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert not fcntl.fcntl(uffd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert "blocking" in repr(uffd) and "non-blocking" not in repr(uffd)


def test_missing_device_falls_back_to_the_syscall(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """No /dev/userfaultfd (a kernel before 6.1, a container): the syscall makes the fd."""
    monkeypatch.setattr(abi, "USERFAULTFD_DEVICE", str(tmp_path / "no-such-device"))
    with Userfaultfd.new(VMM_SWAP_FEATURES) as uffd:
        assert uffd.created_by == CREATED_BY_SYSCALL
        assert uffd.features == VMM_SWAP_FEATURES
        assert uffd.try_clone().created_by == CREATED_BY_SYSCALL
    assert Userfaultfd.probe().features  # the probe falls back the same way


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_probe_does_not_spend_a_handshake() -> None:
    """The probe's handshake is on its own descriptor, which it closes; a real one still works."""
    before = _open_fds()
    support = Userfaultfd.probe()
    assert _open_fds() == before  # its descriptor is closed, not left behind
    assert VMM_SWAP_FEATURES in support.features  # a zero-feature handshake reports them all
    assert isinstance(support, KernelSupport)
    assert isinstance(support.features, Feature)
    assert abi.UFFD_API_IOCTLS in support.ioctls
    assert Userfaultfd.probe(user_mode_only=True).features == support.features
    # The features can then be asked for on a fresh descriptor.
    with Userfaultfd.new(support.features & ~Feature.EVENT_FORK) as uffd:
        assert uffd.features == support.features & ~Feature.EVENT_FORK
        assert uffd.supported_features == support.features


def test_wp_async_turns_on_wp_unpopulated() -> None:
    if Feature.WP_ASYNC not in Userfaultfd.probe().features:
        pytest.skip("no WP_ASYNC")
    with Userfaultfd.new(Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP) as uffd:
        assert Feature.WP_UNPOPULATED in uffd.features


def test_unsupported_feature_is_named() -> None:
    with pytest.raises(OSError, match=r"does not support 0x20000000000") as info:
        Userfaultfd.new(Feature(1 << 41) | Feature.EVENT_REMOVE)
    assert info.value.errno == errno.EINVAL


def test_repr_close_and_context_manager() -> None:
    uffd = Userfaultfd.new(Feature.EVENT_REMOVE)
    fd = uffd.fileno()
    assert uffd.as_raw_descriptor() == fd
    text = repr(uffd)
    assert f"fd={fd}" in text and "EVENT_REMOVE" in text and "non-blocking" in text
    with uffd:
        assert not uffd.closed
    assert uffd.closed
    assert repr(uffd) == "<Userfaultfd closed>"
    with pytest.raises(ValueError, match="closed"):
        uffd.fileno()
    uffd.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)


def test_try_clone_and_from_raw_descriptor() -> None:
    with Userfaultfd.new(Feature.EVENT_REMOVE) as uffd:
        clone = uffd.try_clone()
        assert clone.fileno() != uffd.fileno()
        assert clone.features == uffd.features
        assert fcntl.fcntl(clone.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{clone.fileno()}") == "anon_inode:[userfaultfd]"
        raw = clone.detach()
        assert clone.closed
        adopted = Userfaultfd.from_raw_descriptor(raw, Feature.EVENT_REMOVE)
        assert adopted.fileno() == raw and adopted.features == Feature.EVENT_REMOVE
        adopted.close()
        assert uffd.read_event() is None  # the original is still open


def _as_nobody(fn: Callable[[], T]) -> Callable[[], T]:
    def run() -> T:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return fn()
    return run


def _denied() -> str:
    try:
        Userfaultfd.new()
    except UffdPermissionError as err:
        return str(err)
    return "created"


@pytest.mark.timeout(30)
def test_denied_everywhere_says_why_and_how() -> None:
    """As an unprivileged user with a root-only device and the sysctl at 0: a clear error."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as sysctl:
        allowed = sysctl.read().strip() != "0"
    if allowed:
        pytest.skip("vm.unprivileged_userfaultfd is 1: unprivileged creation is allowed")
    if os.path.exists(abi.USERFAULTFD_DEVICE) and os.stat(abi.USERFAULTFD_DEVICE).st_mode & 0o006:
        pytest.skip("/dev/userfaultfd is world-accessible")
    message = run_in_child(_as_nobody(_denied))
    for hint in ("/dev/userfaultfd", "CAP_SYS_PTRACE", "vm.unprivileged_userfaultfd",
                 "user_mode_only"):
        assert hint in message


def _user_mode_only_after_denial() -> tuple[bool, int]:
    with Userfaultfd.new(Feature.EVENT_REMOVE, user_mode_only=True) as uffd:
        support = Userfaultfd.probe()  # falls back to a user-mode-only probe
        return uffd.features == Feature.EVENT_REMOVE, int(support.features)


def _fork_feature_denied() -> str:
    try:
        Userfaultfd.new(Feature.EVENT_FORK, user_mode_only=True)
    except UffdPermissionError as err:
        return str(err)
    return "created"


@pytest.mark.timeout(30)
def test_unprivileged_user_mode_only_and_event_fork() -> None:
    """A denied device falls back to the syscall; EVENT_FORK without CAP_SYS_PTRACE is EPERM."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    ok, features = run_in_child(_as_nobody(_user_mode_only_after_denial))
    assert ok
    assert features == int(Userfaultfd.probe().features)
    assert "CAP_SYS_PTRACE" in run_in_child(_as_nobody(_fork_feature_denied))
