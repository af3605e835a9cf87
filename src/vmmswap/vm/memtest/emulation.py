"""Finish the one x87 instruction memtest86+ runs at startup that PVM cannot emulate: FINIT.

memtest's 64-bit entry executes ``finit`` (``9B DB E3``: FWAIT then FNINIT) once. On PVM guest
ring-0 code goes through KVM's instruction emulator, which implements neither and returns
KVM_EXIT_INTERNAL_ERROR with the instruction bytes. FNINIT only resets the x87 state, which the
VMM can do exactly through KVM_SET_FPU (control word 0x37F, status and tag words empty); FWAIT
with nothing pending does nothing. Any other failure stays an error. memtest's other x87 use, its
memory benchmark, is kept out with ``nobench``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Final

from vmmswap.kernel import kvm as k
from vmmswap.vm.kvm import VcpuFd
from vmmswap.vm.linux.emulation import failed_instruction

FWAIT: Final = b"\x9b"
FNINIT: Final = b"\xdb\xe3"
#: The x87 control word after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
FCW_INIT: Final = 0x37F


class FinitFixup:
    """Counts the FINITs finished for the guest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def handle(self, vcpu: VcpuFd) -> bool:
        insn = failed_instruction(vcpu)
        if insn is None:
            return False
        if insn.startswith(FWAIT + FNINIT):
            length = len(FWAIT + FNINIT)
        elif insn.startswith(FNINIT):
            length = len(FNINIT)
        else:
            return False
        fpu = vcpu.get_fpu()
        fpu.fcw = FCW_INIT
        fpu.fsw = 0
        fpu.ftwx = 0
        fpu.last_opcode = 0
        fpu.last_ip = 0
        fpu.last_dp = 0
        vcpu.set_fpu(fpu)
        regs = vcpu.get_regs()
        regs.rip += length
        vcpu.set_regs(regs)
        with self._lock:
            self.count += 1
        return True

    def install(self, vcpus: Iterable[VcpuFd]) -> None:
        """Wrap each vCPU's ``run`` so a finished FINIT re-enters KVM_RUN transparently."""
        for vcpu in vcpus:
            vcpu.run = self._wrap(vcpu, vcpu.run)  # type: ignore[method-assign]

    def _wrap(self, vcpu: VcpuFd, run: Callable[[], int]) -> Callable[[], int]:
        def run_with_fixup() -> int:
            while True:
                try:
                    reason = run()
                except BlockingIOError:
                    continue  # EAGAIN after INIT/SIPI on an application processor
                if reason != k.KVM_EXIT_INTERNAL_ERROR or not self.handle(vcpu):
                    return reason
        return run_with_fixup
