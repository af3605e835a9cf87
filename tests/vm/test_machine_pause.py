"""Machine.pause: every vCPU stopped outside KVM_RUN wherever the guest is, a job run on each
vCPU's own thread, then resumed -- the safe point for guests that never idle at a port.
"""

from __future__ import annotations

import time

import pytest
from vm_helpers import MIB, needs_kvm

from vmmswap.vm import layout as lay
from vmmswap.vm.guest_abi import Op
from vmmswap.vm.kvm import VcpuFd
from vmmswap.vm.micro import MicroVM

pytestmark = [pytest.mark.timeout(120)]


@needs_kvm
def test_pause_mid_command_and_resume(micro_vm: MicroVM) -> None:
    """vCPU 0 is inside a long FILL (in KVM_RUN), vCPU 1 idles at its command port (in a
    device handler, served through pause_point); both report, and the fill then completes
    with every qword right."""
    length = 24 * MIB
    pending = micro_vm.device.submit(0, Op.FILL, [lay.SYSTEM_SIZE, length, 5])
    time.sleep(0.05)
    states = micro_vm.machine.pause(lambda v: (v.index, v.get_regs().rip))
    assert [index for index, _rip in states] == [0, 1]
    assert all(lay.PROGRAM_ADDR <= rip < lay.PROGRAM_ADDR + lay.PROGRAM_MAX_SIZE
               for _i, rip in states)
    time.sleep(0.1)  # paused: nothing runs
    micro_vm.machine.resume()
    micro_vm.workload.wait(pending)
    assert micro_vm.workload.verify(0, length, 5).mismatches == 0


@needs_kvm
def test_pause_timeout_resumes_everything(micro_vm: MicroVM) -> None:
    """Negative control: a job that fails on one vCPU is raised, and the machine runs on."""
    def job(vcpu: VcpuFd) -> int:
        if vcpu.index == 1:
            raise OSError("capture failed")
        return vcpu.index

    with pytest.raises(OSError, match="capture failed"):
        micro_vm.machine.pause(job)
    micro_vm.workload.fill(0, 4 * MIB, 3)
    assert micro_vm.workload.verify(0, 4 * MIB, 3).mismatches == 0
    with pytest.raises(RuntimeError, match="needs running vCPUs"):
        micro_vm.shutdown()
        micro_vm.machine.pause(job)
