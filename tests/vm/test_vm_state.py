"""The snapshot state file (vm_state) and vCPU/device state capture (machine_state).

The format tests need no KVM: a state is built from zeroed structs, encoded, decoded, and every
kind of damage (another format, version, a changed byte, a wrong struct size, a memory map that
is not back to back) must be refused with a message that names it. The capture tests round-trip
a real vCPU's and VM's state (registers, XSAVE, MSRs, LAPIC, irqchip, PIT, clock) into a second
VM; the negative control shows the comparison notices a state that was not restored.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vm_helpers import needs_kvm

from vmmswap.dataplane.guest_memory import GuestMemory
from vmmswap.kernel import kvm as k
from vmmswap.kernel import kvm_state as ks
from vmmswap.vm import machine_state as ms
from vmmswap.vm.machine import Machine
from vmmswap.vm.vm_state import (
    MemoryRegionState,
    VcpuState,
    VmState,
    VmStateError,
    decode_state,
    encode_state,
    load_state,
    save_state,
)

MIB = 1 << 20


def _state(vcpus: int = 2) -> VmState:
    regs = k.KvmRegs(rip=0x100000, rsp=0x140000, rflags=2)
    return VmState(
        regions=[MemoryRegionState(0, 32 * MIB, 0),
                 MemoryRegionState(4 << 30, 32 * MIB, 32 * MIB)],
        vcpus=[VcpuState(index=i, regs=bytes(regs), sregs=bytes(k.KvmSregs()),
                         events=bytes(k.KvmVcpuEvents()), mp_state=0,
                         msrs={0x10: 12345, 0xC000_0081: 1 << 63},
                         xsave=bytes(ctypes.sizeof(ks.KvmXsave)), xcrs=bytes(ks.KvmXcrs()))
               for i in range(vcpus)],
        clock_ns=987654321, tsc_khz=2_000_000, guest={"kind": "x", "checksums": [1, 2]})


def test_round_trip(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "vmstate.json"
    save_state(str(path), state)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    back = load_state(str(path))
    assert back == state
    assert back.memory_size == 64 * MIB


def _tamper(data: bytes, change: Callable[[dict[str, Any]], object]) -> bytes:
    """Apply ``change`` to the document and re-seal it, so the check under test is reached."""
    doc = json.loads(data)
    change(doc)
    doc["sha256"] = hashlib.sha256(json.dumps(doc["state"], sort_keys=True).encode()).hexdigest()
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format="firecracker"), "not a vmmswap-vm-state file"),
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d["state"]["vcpus"][0].update(regs="AAAA"), "regs is 3 bytes"),
    (lambda d: d["state"]["vcpus"][1].update(index=0), "out of order"),
    (lambda d: d["state"]["regions"][1].update(file_offset=0), "back to back"),
    (lambda d: d["state"]["regions"][1].update(guest_addr=0), "overlaps"),
    (lambda d: d["state"]["regions"][0].update(size=4097), "pages"),
    (lambda d: d["state"]["vcpus"][0].update(xsave=None), "exactly one of xsave and fpu"),
    (lambda d: d["state"]["vcpus"][0]["msrs"].update({"zz": 1}), "not hex"),
    (lambda d: d["state"].update(page_size=8192), "neither 4 KiB nor 2 MiB"),
    (lambda d: d["state"].update(irqchips=["AA=="]), "3 in-kernel chips"),
])
def test_bad_state_refused(change: Callable[[dict[str, Any]], object], message: str) -> None:
    data = _tamper(encode_state(_state()), change)
    with pytest.raises(VmStateError, match=message):
        decode_state(data)


def test_changed_byte_fails_the_digest() -> None:
    data = encode_state(_state())
    bad = data.replace(b'"clock_ns": 987654321', b'"clock_ns": 987654322')
    assert bad != data
    with pytest.raises(VmStateError, match="SHA-256"):
        decode_state(bad)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VmStateError, match="not JSON"):
        decode_state(b"\x00garbage")
    with pytest.raises(VmStateError, match="cannot read"):
        load_state(str(tmp_path / "nope.json"))


def test_encode_refuses_an_invalid_state() -> None:
    state = _state()
    state.vcpus[0].regs = b"short"
    with pytest.raises(VmStateError, match="regs"):
        encode_state(state)


# --- capture / restore on KVM ------------------------------------------------------------------
def _capture(machine: Machine, msrs: list[int]) -> tuple[VcpuState, tuple[object, ...]]:
    vcpu = ms.capture_vcpu(machine.vcpus[0], xsave_size=machine.vm.xsave_size(), msrs=msrs,
                           lapic=True)
    _clock, chips, pit = ms.capture_devices(machine.vm, irqchip=True, pit=True)
    return vcpu, (chips, pit)


@needs_kvm
@pytest.mark.timeout(60)
@pytest.mark.parametrize("restore", [True, False], ids=["restored", "negative-control"])
def test_capture_restore_round_trip(restore: bool) -> None:
    with GuestMemory.create([(0, 4 * MIB)]) as memory, \
            Machine(memory, irqchip=True, pit=True) as a, \
            Machine(memory, irqchip=True, pit=True) as b:
        vcpu = a.vcpus[0]
        regs = vcpu.get_regs()
        regs.rax, regs.rip, regs.r15 = 0x1234, 0xFFF0, 0xDEAD_BEEF
        vcpu.set_regs(regs)
        sregs = vcpu.get_sregs()
        sregs.cr3 = 0x10000
        vcpu.set_sregs(sregs)
        lapic = bytearray(vcpu.get_lapic())
        lapic[k.APIC_SVR_OFFSET + 1] |= k.APIC_SVR_ENABLE >> 8
        vcpu.set_lapic(bytes(lapic))
        a.vm.irq_line(4, 1)  # leave a mark in the PIC/IOAPIC state
        msrs = ms.snapshot_msrs(a)
        assert ks.X86_MSR_IA32_TSC in msrs
        vcpu.set_msrs({ks.X86_MSR_STAR: 0x0023_0010_0000_0000})
        saved, devices = _capture(a, msrs)
        clock, chips, pit = ms.capture_devices(a.vm, irqchip=True, pit=True)
        if restore:
            ms.restore_devices(b.vm, clock_ns=clock, irqchips=chips, pit=pit)
            ms.restore_vcpu(b.vcpus[0], saved, xsave_size=b.vm.xsave_size())
        again, devices_b = _capture(b, msrs)
        same = (again.regs == saved.regs and again.sregs == saved.sregs
                and again.lapic == saved.lapic and devices_b[0] == devices[0]
                and again.msrs[ks.X86_MSR_STAR] == saved.msrs[ks.X86_MSR_STAR])
        assert same is restore
        if restore:
            assert again.xsave == saved.xsave and again.xcrs == saved.xcrs
            tsc = again.msrs[ks.X86_MSR_IA32_TSC] - saved.msrs[ks.X86_MSR_IA32_TSC]
            assert 0 <= tsc < 60 * 10**9 * 10  # continued from the saved TSC


@needs_kvm
@pytest.mark.timeout(60)
def test_restore_refuses_a_state_for_another_vcpu() -> None:
    with GuestMemory.create([(0, 4 * MIB)]) as memory, Machine(memory, vcpus=2) as m:
        saved = ms.capture_vcpu(m.vcpus[0], xsave_size=m.vm.xsave_size(), msrs=[],
                                lapic=False)
        with pytest.raises(VmStateError, match="vCPU 0 given to vCPU 1"):
            ms.restore_vcpu(m.vcpus[1], saved, xsave_size=m.vm.xsave_size())
