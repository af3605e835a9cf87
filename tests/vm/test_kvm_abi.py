"""The KVM ABI module against the C headers of this machine (skipped without them)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from vmmswap.kernel import kvm as k
from vmmswap.kernel import kvm_state as ks

HEADER = Path("/usr/include/linux/kvm.h")

IOCTLS = [
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_GET_EMULATED_CPUID",
    "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_IRQ_LINE_STATUS",
    "KVM_IRQFD", "KVM_CREATE_PIT2", "KVM_SET_BOOT_CPU_ID", "KVM_IOEVENTFD", "KVM_SET_CLOCK",
    "KVM_GET_CLOCK", "KVM_ENABLE_CAP", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS",
    "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_FPU",
    "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2", "KVM_GET_CPUID2",
    "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_SET_TSC_KHZ", "KVM_GET_TSC_KHZ",
    "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_INTERNAL_ERROR_EMULATION",
    "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES",
    "KVM_EXIT_IO", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT",
    "KVM_CAP_IRQCHIP", "KVM_CAP_PIT2", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_GET_TSC_KHZ",
    "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_SET_IDENTITY_MAP_ADDR", "KVM_CAP_NR_MEMSLOTS",
    # snapshot/restore state (issue 14)
    "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_XSAVE",
    "KVM_SET_XSAVE", "KVM_GET_XSAVE2", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_CAP_XSAVE",
    "KVM_CAP_XSAVE2", "KVM_CAP_XCRS", "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_VCPU_EVENTS",
    "KVM_CLOCK_TSC_STABLE", "KVM_CLOCK_REALTIME", "KVM_CLOCK_HOST_TSC",
    "KVM_VCPUEVENT_VALID_NMI_PENDING", "KVM_VCPUEVENT_VALID_SIPI_VECTOR",
    "KVM_VCPUEVENT_VALID_SHADOW", "KVM_APIC_REG_SIZE", "KVM_IOAPIC_NUM_PINS", "KVM_MAX_XCRS",
    "KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC", "KVM_NR_IRQCHIPS",
    "KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_HALTED", "KVM_GET_DIRTY_LOG",
    "KVM_MEM_LOG_DIRTY_PAGES",
]

LAYOUTS = {
    "sizeof(struct kvm_run)": ctypes.sizeof(k.KvmRun),
    "offsetof(struct kvm_run, exit_reason)": k.KvmRun.exit_reason.offset,
    "offsetof(struct kvm_run, io)": k.KvmRun.exit.offset,
    "offsetof(struct kvm_run, kvm_valid_regs)": k.KvmRun.kvm_valid_regs.offset,
    "sizeof(struct kvm_regs)": ctypes.sizeof(k.KvmRegs),
    "sizeof(struct kvm_sregs)": ctypes.sizeof(k.KvmSregs),
    "sizeof(struct kvm_segment)": ctypes.sizeof(k.KvmSegment),
    "sizeof(struct kvm_fpu)": ctypes.sizeof(k.KvmFpu),
    "sizeof(struct kvm_cpuid_entry2)": ctypes.sizeof(k.KvmCpuidEntry2),
    "sizeof(struct kvm_userspace_memory_region)": ctypes.sizeof(k.KvmUserspaceMemoryRegion),
    "sizeof(struct kvm_pit_config)": ctypes.sizeof(k.KvmPitConfig),
    "sizeof(struct kvm_irq_level)": ctypes.sizeof(k.KvmIrqLevel),
    "sizeof(struct kvm_msr_entry)": ctypes.sizeof(k.KvmMsrEntry),
    "sizeof(struct kvm_vcpu_events)": ctypes.sizeof(k.KvmVcpuEvents),
    "offsetof(struct kvm_vcpu_events, flags)": k.KvmVcpuEvents.flags.offset,
    "offsetof(struct kvm_vcpu_events, exception_payload)":
        k.KvmVcpuEvents.exception_payload.offset,
    "sizeof(struct kvm_irqchip)": ctypes.sizeof(ks.KvmIrqchip),
    "sizeof(struct kvm_pit_channel_state)": ctypes.sizeof(ks.KvmPitChannelState),
    "sizeof(struct kvm_pit_state2)": ctypes.sizeof(ks.KvmPitState2),
    "offsetof(struct kvm_pit_state2, flags)": ks.KvmPitState2.flags.offset,
    "sizeof(struct kvm_xsave)": ctypes.sizeof(ks.KvmXsave),
    "sizeof(struct kvm_xcrs)": ctypes.sizeof(ks.KvmXcrs),
    "sizeof(struct kvm_clock_data)": ctypes.sizeof(k.KvmClockData),
    "sizeof(struct kvm_lapic_state)": ctypes.sizeof(k.KvmLapicState),
    "sizeof(struct kvm_mp_state)": ctypes.sizeof(k.KvmMpState),
    "sizeof(struct kvm_dirty_log)": ctypes.sizeof(ks.KvmDirtyLog),
}


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None or not HEADER.exists():
        pytest.skip("needs gcc and <linux/kvm.h> to compare against")
    tmp = tmp_path_factory.mktemp("kvm_abi")
    names = IOCTLS + list(LAYOUTS)
    lines = "\n".join(f'printf("%lu\\n", (unsigned long)({n}));' for n in names)
    src = tmp / "abi.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
                   f"int main(void) {{\n{lines}\nreturn 0; }}\n")
    subprocess.run([gcc, str(src), "-o", str(tmp / "abi")], check=True, capture_output=True)
    out = subprocess.run([str(tmp / "abi")], check=True, capture_output=True, text=True)
    return dict(zip(names, map(int, out.stdout.split()), strict=True))


@pytest.mark.parametrize("name", IOCTLS)
def test_constant_matches_header(c_values: dict[str, int], name: str) -> None:
    module = ks if hasattr(ks, name) else k
    assert getattr(module, name) == c_values[name]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_header(c_values: dict[str, int], name: str) -> None:
    assert LAYOUTS[name] == c_values[name]


def test_exit_reason_names() -> None:
    assert k.EXIT_REASON_NAMES[k.KVM_EXIT_IO] == "KVM_EXIT_IO"
    assert k.EXIT_REASON_NAMES[k.KVM_EXIT_SHUTDOWN] == "KVM_EXIT_SHUTDOWN"
