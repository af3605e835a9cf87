"""CPUID adjustments, the emulation-failure decoder and the guest command line."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vmmswap.kernel import kvm as k
from vmmswap.vm.linux.cpuid import CPUID_1_ECX_CX16, guest_cpuid
from vmmswap.vm.linux.emulation import (
    MXCSR_DEFAULT,
    EmulationFixups,
    failed_instruction,
    modrm_operand_length,
)
from vmmswap.vm.linux.guest import BASE_CMDLINE, PVM_CMDLINE, LinuxGuestConfig


def _entry(function: int, index: int = 0, **regs: int) -> k.KvmCpuidEntry2:
    return k.KvmCpuidEntry2(function=function, index=index, **regs)


def test_guest_cpuid_sets_topology_and_hides_cx16() -> None:
    supported = [_entry(1, ebx=0x0001_0800, ecx=CPUID_1_ECX_CX16 | 1), _entry(0xB, 1),
                 _entry(0x8000_001E, eax=0)]
    adjusted = {e.function: e for e in guest_cpuid(supported, 3)}
    assert adjusted[1].ebx >> 24 == 3 and adjusted[1].ebx & 0xFFFF == 0x0800
    assert not adjusted[1].ecx & CPUID_1_ECX_CX16 and adjusted[1].ecx & 1
    assert adjusted[1].ecx & k.X86_CPUID_HYPERVISOR_ECX
    assert adjusted[0xB].edx == 3 and adjusted[0x8000_001E].eax == 3
    assert supported[0].ecx & CPUID_1_ECX_CX16, "the input list must not be modified"


def _failure(suberror: int, flags: int, insn: bytes) -> Any:
    raw = bytes([len(insn)]) + insn
    raw = raw.ljust(16, b"\0")
    data = [flags, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")]
    internal = SimpleNamespace(suberror=suberror, ndata=len(data), data=data)
    return SimpleNamespace(run_state=SimpleNamespace(exit=SimpleNamespace(internal=internal)))


def test_failed_instruction_decodes_kvm_bytes() -> None:
    vcpu = _failure(k.KVM_INTERNAL_ERROR_EMULATION, 1, b"\xcc\x90\x90")
    assert failed_instruction(vcpu) == b"\xcc\x90\x90"


def test_failed_instruction_absent_without_flag_or_for_other_errors() -> None:
    assert failed_instruction(_failure(k.KVM_INTERNAL_ERROR_EMULATION, 0, b"\xcc")) is None
    assert failed_instruction(_failure(k.KVM_INTERNAL_ERROR_DELIVERY_EV, 1, b"\xcc")) is None


def test_cmdline_carries_workload_settings_and_pvm_workarounds() -> None:
    config = LinuxGuestConfig(data_mb=8, period=3, verbose=False, extra_cmdline="foo=1")
    plain = config.cmdline(0x501)
    assert plain.startswith(BASE_CMDLINE)
    assert "vmmswap_mb=8 vmmswap_period=3 vmmswap_port=1281" in plain
    assert "quiet" in plain.split() and plain.endswith("foo=1")
    assert PVM_CMDLINE not in plain
    assert PVM_CMDLINE in config.cmdline(0x501, software_kvm=True)


class FakeVcpu:
    """Enough of VcpuFd for the fix-ups that need no ioctl."""

    def __init__(self, insn: bytes) -> None:
        self.run_state = _failure(k.KVM_INTERNAL_ERROR_EMULATION, 1, insn).run_state
        self.regs = k.KvmRegs(rip=0x1000)
        self.fpu = k.KvmFpu(mxcsr=0)

    def get_regs(self) -> k.KvmRegs:
        return self.regs

    def set_regs(self, regs: k.KvmRegs) -> None:
        self.regs = regs

    def get_fpu(self) -> k.KvmFpu:
        return self.fpu

    def set_fpu(self, fpu: k.KvmFpu) -> None:
        self.fpu = fpu


def test_modrm_lengths() -> None:
    assert modrm_operand_length(bytes([0x54, 0x24, 0x04])) == 3  # [rsp+disp8] via SIB
    assert modrm_operand_length(bytes([0x15, 0, 0, 0, 0])) == 5  # [rip+disp32]
    assert modrm_operand_length(bytes([0x17])) == 1  # [rdi]
    assert modrm_operand_length(bytes([0x97, 0, 0, 0, 0])) == 5  # [rdi+disp32]
    with pytest.raises(ValueError, match="register"):
        modrm_operand_length(bytes([0xD0]))


def test_ldmxcsr_sets_default_mxcsr_and_skips_instruction() -> None:
    vcpu = FakeVcpu(b"\x0f\xae\x54\x24\x04\x83\x7c")
    fixups = EmulationFixups()
    assert fixups.handle(vcpu)  # type: ignore[arg-type]
    assert vcpu.regs.rip == 0x1005 and vcpu.fpu.mxcsr == MXCSR_DEFAULT
    assert fixups.counts["ldmxcsr"] == 1


def test_fwait_is_skipped_and_unknown_instructions_are_left_alone() -> None:
    fwait = FakeVcpu(b"\x9b\x65\x48")
    fixups = EmulationFixups()
    assert fixups.handle(fwait)  # type: ignore[arg-type]
    assert fwait.regs.rip == 0x1001
    other = FakeVcpu(b"\xf3\x48\x0f\xb8\xc7")  # popcnt: not ours to finish
    assert not fixups.handle(other)  # type: ignore[arg-type]
    assert other.regs.rip == 0x1000
