"""Measured quirk: with a user-mode-only uffd, the kernel's own accesses to a missing registered
page fail with EFAULT at once (no event, no signal); user-space accesses still fault."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest
from uffd_helpers import make_area, run_in_child

from vmmswap.kernel import libc
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd


def kernel_write_into_missing_page() -> tuple[int, int, object]:
    area = make_area("anon", 1)
    uffd = Userfaultfd.new(user_mode_only=True)
    uffd.register(area.address, area.length)
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    ret = libc.libc.read(zero, ctypes.c_void_p(area.address), ctypes.c_size_t(PAGE_SIZE))
    err = ctypes.get_errno()
    return ret, err, uffd.read_event()


@pytest.mark.timeout(30)
def test_kernel_access_fails_with_efault() -> None:
    ret, err, event = run_in_child(kernel_write_into_missing_page)
    assert (ret, err, event) == (-1, errno.EFAULT, None)
