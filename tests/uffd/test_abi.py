"""The kernel ABI in ``vmmswap.kernel.uffd`` against the reference table (x86_64/arm64 values).

The numbers below were computed from the C headers with a local build (reference
``userfaultfd.md`` section 1.3); the module computes them with the ``_IOC`` helpers.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from vmmswap.kernel import ioctl
from vmmswap.kernel import uffd as abi
from vmmswap.kernel.uffd import Feature, Ioctls, PagefaultFlag, RegisterMode

GENERIC_IOC = not platform.machine().startswith(("ppc", "powerpc", "mips", "sparc", "alpha"))
generic_only = pytest.mark.skipif(not GENERIC_IOC, reason="the table is x86_64/arm64 encoding")


@generic_only
@pytest.mark.parametrize(("name", "expected"), [
    ("UFFDIO_API_IOCTL", 0xC018AA3F),
    ("UFFDIO_REGISTER", 0xC020AA00),
    ("UFFDIO_UNREGISTER", 0x8010AA01),
    ("UFFDIO_WAKE", 0x8010AA02),
    ("UFFDIO_COPY", 0xC028AA03),
    ("UFFDIO_ZEROPAGE", 0xC020AA04),
    ("UFFDIO_MOVE", 0xC028AA05),
    ("UFFDIO_WRITEPROTECT", 0xC018AA06),
    ("UFFDIO_CONTINUE", 0xC020AA07),
    ("UFFDIO_POISON", 0xC020AA08),
    ("USERFAULTFD_IOC_NEW", 0xAA00),
])
def test_ioctl_numbers_match_the_reference_table(name: str, expected: int) -> None:
    assert getattr(abi, name) == expected


@generic_only
def test_ioc_helpers_encode_like_the_kernel_macros() -> None:
    assert ioctl.io(0xAA, 0) == 0xAA00
    assert ioctl.ior(0xAA, 1, 16) == 0x8010AA01
    assert ioctl.iow(0xAA, 1, 16) == 0x4010AA01
    assert ioctl.iowr(0xAA, 0x3F, 24) == 0xC018AA3F
    pagemap_scan = ioctl.ioc(ioctl.IOC_READ | ioctl.IOC_WRITE, ord("f"), 16, 96)
    assert pagemap_scan == 0xC0606610


def test_ioc_rejects_fields_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="nr"):
        ioctl.ioc(0, 0xAA, 256, 0)
    with pytest.raises(ValueError, match="type"):
        ioctl.ioc(0, 256, 0, 0)
    with pytest.raises(ValueError, match="size"):
        ioctl.ioc(0, 0xAA, 0, 1 << 14)


@pytest.mark.parametrize(("layout", "size"), [
    (abi.UFFDIO_API_STRUCT, 24), (abi.UFFDIO_RANGE_STRUCT, 16), (abi.UFFDIO_REGISTER_STRUCT, 32),
    (abi.UFFDIO_COPY_STRUCT, 40), (abi.UFFDIO_ZEROPAGE_STRUCT, 32), (abi.UFFDIO_MOVE_STRUCT, 40),
    (abi.UFFDIO_WRITEPROTECT_STRUCT, 24), (abi.UFFDIO_CONTINUE_STRUCT, 32),
    (abi.UFFDIO_POISON_STRUCT, 32),
])
def test_struct_sizes(layout: object, size: int) -> None:
    assert layout.size == size  # type: ignore[attr-defined]


def test_result_fields_are_the_last_s64_of_each_struct() -> None:
    for layout, offset in [(abi.UFFDIO_COPY_STRUCT, abi.UFFDIO_COPY_RESULT_OFFSET),
                           (abi.UFFDIO_ZEROPAGE_STRUCT, abi.UFFDIO_ZEROPAGE_RESULT_OFFSET),
                           (abi.UFFDIO_MOVE_STRUCT, abi.UFFDIO_MOVE_RESULT_OFFSET),
                           (abi.UFFDIO_CONTINUE_STRUCT, abi.UFFDIO_CONTINUE_RESULT_OFFSET),
                           (abi.UFFDIO_POISON_STRUCT, abi.UFFDIO_POISON_RESULT_OFFSET)]:
        assert offset == layout.size - 8
        assert layout.format.endswith("q")  # signed: it carries -errno
    assert abi.UFFDIO_MAX_STRUCT_SIZE == 40


def test_uffd_msg_layout_offsets() -> None:
    """uffd_msg is 32 packed bytes: event@0, pagefault {flags@8, address@16, ptid@24}."""
    assert abi.UFFD_MSG_SIZE == 32
    raw = bytes([0x12]) + bytes(7) + (5).to_bytes(8, "little") + (0x1000).to_bytes(8, "little") \
        + (77).to_bytes(4, "little") + bytes(4)
    assert abi.UFFD_MSG_PAGEFAULT.unpack(raw) == (5, 0x1000, 77)
    assert abi.UFFD_MSG_HEADER.unpack_from(raw) == (0x12,)
    fork = bytes([0x13]) + bytes(7) + (9).to_bytes(4, "little") + bytes(20)
    assert abi.UFFD_MSG_FORK.unpack(fork) == (9,)


def test_flag_values() -> None:
    assert abi.UFFD_API == 0xAA
    assert abi.UFFD_USER_MODE_ONLY == 1
    assert [int(m) for m in RegisterMode] == [1, 2, 4]
    assert [int(f) for f in PagefaultFlag] == [1, 2, 4]
    assert [int(f) for f in Feature] == [1 << i for i in range(17)]
    assert int(Ioctls.API) == 1 << 0x3F
    assert [e.value for e in abi.EventType] == [0x12, 0x13, 0x14, 0x15, 0x16]
    assert abi.UFFD_API_IOCTLS == Ioctls.REGISTER | Ioctls.UNREGISTER | Ioctls.API
    assert abi.UFFD_API_RANGE_IOCTLS_BASIC == abi.UFFD_API_RANGE_IOCTLS & ~(
        Ioctls.ZEROPAGE | Ioctls.MOVE)
    assert abi.PM_UFFD_WP == 1 << 57


def test_flags_keep_unknown_bits() -> None:
    """A newer kernel's bits survive (the Rust crate drops them)."""
    feature = Feature((1 << 17) | Feature.MOVE)
    assert int(feature) == (1 << 17) | (1 << 16)
    assert Feature.MOVE in feature
    assert int(Ioctls(1 << 9)) == 1 << 9
    assert int(PagefaultFlag(1 << 5 | 1)) == 0x21
    assert int(RegisterMode(1 << 3)) == 8


def test_every_feature_has_a_release() -> None:
    assert set(abi.FEATURE_SINCE) == set(Feature)
    assert int(abi.KNOWN_FEATURES) == (1 << 17) - 1


@pytest.mark.parametrize(("name", "header", "macro"), [
    ("MFD_CLOEXEC", "linux/memfd.h", "MFD_CLOEXEC"),
    ("MFD_HUGETLB", "linux/memfd.h", "MFD_HUGETLB"),
    ("MFD_HUGE_SHIFT", "linux/memfd.h", "MFD_HUGE_SHIFT"),
    ("MFD_HUGE_2MB", "linux/memfd.h", "MFD_HUGE_2MB"),
    ("MFD_HUGE_1GB", "linux/memfd.h", "MFD_HUGE_1GB"),
    ("HUGETLBFS_MAGIC", "linux/magic.h", "HUGETLBFS_MAGIC"),
])
def test_huge_page_constants_match_the_installed_headers(name: str, header: str,
                                                         macro: str) -> None:
    """memfd and hugetlbfs constants against the C headers, evaluated by the preprocessor."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from vmmswap.kernel import libc  # noqa: PLC0415

    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include", header).exists():
        pytest.skip(f"needs gcc and /usr/include/{header}")
    src = f"#include <{header}>\nunsigned long long v = {macro};\n"
    out = subprocess.run([gcc, "-E", "-P", "-x", "c", "-"], input=src, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    expr = out.strip().splitlines()[-1].split("=", 1)[1].rstrip(";").strip()
    value = eval(expr.replace("U", ""), {})
    assert getattr(libc, name) == value


def test_statfs_layout_matches_the_installed_headers(tmp_path: Path) -> None:
    """``libc.fs_type`` reads ``f_type`` as the first 8 bytes of a 120-byte ``struct statfs``;
    a C program built against the headers says whether that is so, and reads a memfd's magic."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from vmmswap.kernel import libc  # noqa: PLC0415

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc")
    src = tmp_path / "statfs.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <sys/vfs.h>\n"
                   "int main(void) { printf(\"%zu %zu %zu\\n\", sizeof(struct statfs), "
                   "offsetof(struct statfs, f_type), sizeof(((struct statfs *)0)->f_type)); }\n")
    exe = tmp_path / "statfs"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True, timeout=60)
    size, offset, width = map(int, subprocess.run([str(exe)], capture_output=True, text=True,
                                                  check=True, timeout=60).stdout.split())
    assert (size, offset, width) == (libc.STATFS_SIZE, 0, 8)
    fd = os.memfd_create("statfs-check", os.MFD_CLOEXEC)
    try:
        assert libc.fs_type(fd) == 0x01021994  # TMPFS_MAGIC: a memfd lives on shmem
    finally:
        os.close(fd)
