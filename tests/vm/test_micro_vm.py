"""The micro-VM without swap: KVM plumbing, the guest's commands, errors and shutdown.

No userfaultfd is involved here, so the VMs run in the test process.
"""

from __future__ import annotations

import errno
import time

import pytest
from vm_helpers import MIB, needs_kvm

from vmmswap.vm import guest_abi as abi
from vmmswap.vm.guest_abi import Op
from vmmswap.vm.guest_build import GuestProgram
from vmmswap.vm.kvm import Kvm, KvmUnavailableError
from vmmswap.vm.machine import GuestError, Machine
from vmmswap.vm.micro import MicroVM
from vmmswap.vm.workload import WorkloadError


def test_missing_kvm_is_a_clear_error() -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist") as info:
        Kvm("/nonexistent/kvm")
    assert info.value.errno == errno.ENOENT


def test_kvm_not_a_kvm_device() -> None:
    with pytest.raises(KvmUnavailableError):
        Kvm("/dev/null")



@needs_kvm
@pytest.mark.timeout(60)
def test_fill_verify_checksum_match_host_model(micro_vm: MicroVM) -> None:
    vm = micro_vm
    w = vm.workload
    report = w.fill(0, 8 * MIB, seed=11)
    assert report.pages == 8 * MIB // 4096
    assert w.verify(0, 8 * MIB, seed=11).mismatches == 0
    wrong = w.verify(0, 8 * MIB, seed=12)
    assert wrong.mismatches == 8 * MIB // 8
    assert wrong.first_bad == vm.layout.span(0, 4096)[0][0]
    sums = w.checksum(0, 8 * MIB, chunk=2 * MIB).checksums
    expected = []
    for addr, size in vm.layout.span(0, 8 * MIB):
        for a in range(addr, addr + size, 2 * MIB):
            expected.append(abi.checksum(a, abi.pattern(a, 2 * MIB, 11)))
    assert sums == expected


@needs_kvm
@pytest.mark.timeout(60)
def test_ranges_cross_regions(micro_vm: MicroVM) -> None:
    vm = micro_vm
    w = vm.workload
    low = vm.layout.data_ranges[0][1]
    w.fill(low - 2 * MIB, 4 * MIB, seed=5)
    assert w.verify(low - 2 * MIB, 4 * MIB, seed=5).mismatches == 0
    pieces = vm.layout.span(low - 2 * MIB, 4 * MIB)
    assert len(pieces) == 2 and pieces[1][0] == 4 << 30


@needs_kvm
@pytest.mark.timeout(60)
def test_rewrite_and_zero_fill(micro_vm: MicroVM) -> None:
    w = micro_vm.workload
    w.fill(0, 4 * MIB, seed=1)
    w.fill(MIB, 2 * MIB, seed=2)
    w.fill(3 * MIB, MIB, seed=0)
    assert w.verify(0, MIB, 1).mismatches == 0
    assert w.verify(MIB, 2 * MIB, 2).mismatches == 0
    assert w.verify(3 * MIB, MIB, 0).mismatches == 0


@needs_kvm
@pytest.mark.timeout(60)
def test_balloon_discards_and_reads_zero(micro_vm: MicroVM) -> None:
    vm = micro_vm
    w = vm.workload
    w.fill(0, 8 * MIB, seed=3)
    before = vm.memory.resident_bytes()
    w.balloon(2 * MIB, 4 * MIB)
    assert vm.memory.resident_bytes() <= before - 4 * MIB
    assert vm.balloon.stats.bytes_returned == 4 * MIB
    assert w.verify(2 * MIB, 4 * MIB, 0).mismatches == 0
    assert w.verify(0, 2 * MIB, 3).mismatches == 0
    assert w.verify(6 * MIB, 2 * MIB, 3).mismatches == 0


@needs_kvm
@pytest.mark.timeout(60)
def test_balloon_refuses_the_system_area(micro_vm: MicroVM) -> None:
    vm = micro_vm
    # The guest asks for its own program pages: refused, nothing discarded.
    pending = vm.device.submit(0, Op.BALLOON, [0x100000, 4096])
    vm.workload.wait(pending)
    assert pending.status == errno.EINVAL
    assert vm.balloon.stats.refused == 1
    assert vm.workload.nop() >= 0  # the guest still runs its program


@needs_kvm
@pytest.mark.timeout(60)
def test_two_vcpus_read_the_same_range(micro_vm: MicroVM) -> None:
    w = micro_vm.workload
    w.fill(0, 8 * MIB, seed=9)
    report = w.read(0, 8 * MIB, vcpus=[0, 1], replicate=True)
    assert report.pages == 2 * 8 * MIB // 4096
    assert report.latency is not None and report.latency.samples == report.pages


@needs_kvm
@pytest.mark.timeout(60)
def test_work_split_across_vcpus(micro_vm: MicroVM) -> None:
    w = micro_vm.workload
    report = w.fill(0, 6 * MIB + 4096, seed=4)
    assert report.pages == (6 * MIB + 4096) // 4096
    assert w.verify(0, 6 * MIB + 4096, 4, vcpus=1).mismatches == 0


@needs_kvm
@pytest.mark.timeout(60)
def test_guest_exception_is_reported(micro_vm: MicroVM) -> None:
    vm = micro_vm
    # 1 TiB is outside the identity map: the guest takes a page fault and reports it.
    pending = vm.device.submit(1, Op.READ, [1 << 40, 4096])
    with pytest.raises(WorkloadError, match=r"exception 14 .*cr2=0x10000000000"):
        vm.workload.wait(pending, timeout=30)
    with pytest.raises(GuestError, match="vCPU 1"):
        vm.machine.join(timeout=30)


@needs_kvm
@pytest.mark.timeout(60)
def test_bad_range_rejected_before_the_guest_sees_it(micro_vm: MicroVM) -> None:
    w = micro_vm.workload
    with pytest.raises(ValueError):
        w.fill(0, 1 << 40, seed=1)
    with pytest.raises(ValueError):
        w.fill(1, 4096, seed=1)
    w.nop()


@needs_kvm
@pytest.mark.timeout(60)
def test_clean_shutdown(micro_vm: MicroVM) -> None:
    micro_vm.shutdown()
    assert not micro_vm.machine.running
    assert sorted(e.reason for e in micro_vm.machine.exits) == ["halted", "halted"]


@needs_kvm
@pytest.mark.timeout(60)
def test_request_stop_interrupts_a_running_guest(guest_program: GuestProgram) -> None:
    with MicroVM(128 * MIB, vcpus=1, program=guest_program) as vm:
        vm.start()
        vm.workload.fill(0, 64 * MIB, seed=1)
        pendings = [vm.device.submit(0, Op.VERIFY, [0x200000, 64 * MIB, 1]) for _ in range(50)]
        time.sleep(0.2)
        vm.machine.request_stop("test")
        vm.machine.join(timeout=10)
        assert not vm.machine.running
        assert not pendings[-1].done.is_set()
        assert vm.machine.exits[0].reason == "stopped"


@needs_kvm
def test_machine_bus_overlap_rejected(guest_program: GuestProgram) -> None:
    with MicroVM(8 * MIB, vcpus=1, program=guest_program) as vm:
        with pytest.raises(ValueError, match="overlaps"):
            vm.machine.add_io_device(abi.BALLOON_PORT + 4, 4, vm.balloon)
        with pytest.raises(ValueError, match="guest RAM"):
            vm.machine.add_mmio_device(0x1000, 0x1000, object())  # type: ignore[arg-type]


@needs_kvm
def test_machine_rejects_bad_vcpu_count(guest_program: GuestProgram) -> None:
    with MicroVM(8 * MIB, vcpus=1, program=guest_program) as vm, pytest.raises(ValueError):
        Machine(vm.memory, vcpus=0)


@needs_kvm
def test_tsc_frequency_known(micro_vm: MicroVM) -> None:
    assert micro_vm.tsc_khz > 100_000


class _Mmio:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def mmio_read(self, addr: int, size: int) -> int:
        return 0x1122334455667788

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.writes.append((addr, size, value))


@needs_kvm
@pytest.mark.timeout(60)
def test_mmio_reads_reach_the_device_and_unclaimed_read_all_ones(
        guest_program: GuestProgram) -> None:
    with MicroVM(8 * MIB, vcpus=1, program=guest_program) as vm:
        device = _Mmio()
        vm.machine.add_mmio_device(0xC000_0000, 4096, device)
        vm.start()
        report_words = vm.workload.wait(vm.device.submit(0, Op.READ, [0xC000_0000, 4096]))
        claimed_sum = _read_sum(report_words.results)
        assert claimed_sum == (512 * 0x1122334455667788) % (1 << 64)
        unclaimed = vm.workload.wait(vm.device.submit(0, Op.READ, [0xC000_1000, 4096]))
        assert _read_sum(unclaimed.results) == (512 * ((1 << 64) - 1)) % (1 << 64)
        pending = vm.device.submit(0, Op.FILL, [0xC000_0000, 4096, 0])
        vm.workload.wait(pending)
        assert len(device.writes) == 512 and device.writes[0] == (0xC000_0000, 8, 0)


def _read_sum(words: list[int]) -> int:
    used = words[4]
    pos = 5 + 2 * used
    return words[pos] | (words[pos + 1] << 32)
