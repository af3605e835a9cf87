"""Unit tests of the memtest guest's pieces that need no KVM: image loading, CPUID, the screen."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmmswap.kernel import bootparam as bp
from vmmswap.kernel import kvm as k
from vmmswap.vm.kvm import kvm_unavailable_reason
from vmmswap.vm.linux.bzimage import BzImageError
from vmmswap.vm.memtest.cpuid import VENDOR, vendor_registers
from vmmswap.vm.memtest.guest import SMP_CMDLINE, MemtestConfig, MemtestGuest
from vmmswap.vm.memtest.image import entry_point, find_image, pad_to_syssize, parse_image
from vmmswap.vm.memtest.screen import Screen, read_status

DATA = Path(__file__).parent / "data"


def _fake_image(pm_size: int, syssize_bytes: int) -> bytes:
    """A minimal protocol-2.12 image: 2 setup sectors, ``pm_size`` bytes of protected mode."""
    data = bytearray(3 * bp.SECTOR_SIZE + pm_size)
    header = bp.SetupHeader()
    header.setup_sects = 2
    header.syssize = (syssize_bytes + 15) // 16
    header.boot_flag = bp.BOOT_FLAG_MAGIC
    header.header = bp.HDRS_MAGIC
    header.version = 0x020C
    header.loadflags = bp.LoadFlags.LOADED_HIGH
    header.code32_start = 0x100000
    header.xloadflags = bp.XLoadFlags.KERNEL_64
    raw = bytes(header)
    data[bp.SETUP_HEADER_OFFSET:bp.SETUP_HEADER_OFFSET + len(raw)] = raw
    data[bp.SETUP_HEADER_LENGTH_BYTE] = len(raw) + bp.SETUP_HEADER_OFFSET \
        - bp.SETUP_HEADER_LENGTH_BASE
    data[3 * bp.SECTOR_SIZE:] = b"\x90" * pm_size
    return bytes(data)


def test_syssize_rounded_past_the_end_is_padded_with_zeros() -> None:
    data = _fake_image(4096 - 8, 4096)
    image = parse_image(data)
    assert len(image.protected_mode) == 4096
    assert image.protected_mode.endswith(bytes(8))
    assert entry_point(image) == 0x100200


def test_a_really_truncated_image_is_still_rejected() -> None:
    """Negative control: padding covers syssize's rounding only, not a short file."""
    data = _fake_image(4096 - 16, 4096)
    assert pad_to_syssize(data) == data
    with pytest.raises(BzImageError, match="truncated"):
        parse_image(data)


def test_debian_memtest_image_parses() -> None:
    try:
        path = find_image()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    image = parse_image(path.read_bytes())
    assert image.header.version == 0x020C
    assert entry_point(image) == 0x100200


def test_vendor_registers_spell_the_vendor() -> None:
    ebx, edx, ecx = vendor_registers(VENDOR)
    assert struct.pack("<III", ebx, edx, ecx) == VENDOR
    assert VENDOR[:1] not in (b"G", b"A")  # memtest's Intel/AMD temperature paths


def test_screen_replays_memtest_boot_bytes() -> None:
    screen = Screen()
    screen.feed((DATA / "boot-screen.bin").read_bytes())
    assert screen.row(0).strip().startswith("Memtest86+ v6.10")
    assert "Test #0" in screen.row(3)
    status = read_status(screen)
    assert status is not None
    assert (status.passes, status.errors, status.test) == (0, 0, "0")


def test_screen_bytes_split_inside_an_escape_give_the_same_screen() -> None:
    raw = (DATA / "boot-screen.bin").read_bytes()
    whole = Screen()
    whole.feed(raw)
    pieces = Screen()
    for i in range(0, len(raw), 7):
        pieces.feed(raw[i:i + 7])
    assert pieces.text() == whole.text()


def test_status_changes_are_read_and_a_wrong_count_is_seen() -> None:
    screen = Screen()
    screen.feed((DATA / "boot-screen.bin").read_bytes())
    screen.feed(b"\x1b[9;51H12\x1b[9;68H3  ")
    status = read_status(screen)
    assert status is not None
    assert (status.passes, status.errors) == (12, 3)


def test_cursor_moves_and_erase() -> None:
    screen = Screen(rows=3, cols=10)
    screen.feed(b"\x1b[2;3Habc\x1b[1;1Hxy\x1b[2;4H\x1b[K")
    assert screen.row(0) == "xy        "
    assert screen.row(1) == "  a       "
    screen.feed(b"\x1b[2J")
    assert screen.text() == "\n\n"
    assert read_status(screen) is None


@pytest.mark.kvm
@pytest.mark.timeout(60)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_smp_guest_software_enables_every_local_apic(vcpus: int) -> None:
    """memtest's SMP needs SVR's enable bit (see vmmswap.vm.memtest.guest); KVM resets it
    off, which the 1-vCPU guest keeps (the control: the bit is really set by the guest)."""
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs a usable /dev/kvm: {reason}")
    try:
        image = find_image()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    config = MemtestConfig.smp(vcpus)
    assert ("nosmp" not in config.cmdline) == (vcpus > 1)
    assert vcpus == 1 or config.cmdline == SMP_CMDLINE
    with MemtestGuest(image, config) as guest:
        svrs = [struct.unpack_from("<I", v.get_lapic(), k.APIC_SVR_OFFSET)[0]
                for v in guest.machine.vcpus]
    assert len(svrs) == vcpus
    assert all(bool(svr & k.APIC_SVR_ENABLE) == (vcpus > 1) for svr in svrs), svrs
