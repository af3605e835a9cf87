"""Finish the few guest-kernel instructions a software KVM cannot emulate.

On PVM (``kvm_pvm``: KVM without VT-x/AMD-V), guest ring-0 code runs through KVM's instruction
emulator. When it meets an instruction it does not implement, KVM_RUN returns
KVM_EXIT_INTERNAL_ERROR (emulation failure) with the instruction bytes. A stock Linux kernel
executes a few such instructions that cannot be avoided from the command line:

* ``int3`` -- the alternatives self-test and live text patching raise #BP on purpose. The VMM
  delivers it: RIP moves past the one-byte instruction (#BP is a trap, so the frame holds the
  next RIP, which the kernel's handler expects) and the exception is injected with
  k.KVM_SET_VCPU_EVENTS.
* ``fwait`` -- waits for pending x87 exceptions; with none pending (the kernel masks them) it
  does nothing, so the VMM skips it.
* ``ldmxcsr m32`` -- Linux executes it in ``kernel_fpu_begin()`` only, always loading
  ``MXCSR_DEFAULT`` (0x1F80) from its stack. The VMM sets MXCSR to that value through
  KVM_SET_FPU and skips the instruction; it never reads the operand (guest memory).

Everything else stays an error. The other instructions PVM's emulator lacks are kept out of the
guest instead: CMPXCHG16B through CPUID (:mod:`vmmswap.vm.linux.cpuid`), XSAVE, POPCNT and
friends through the command line (:data:`vmmswap.vm.linux.guest.PVM_CMDLINE`).

:func:`install` wraps ``VcpuFd.run`` of each vCPU (instance attribute): the machine's vCPU loop
sees only the exits it knows. The wrapper also re-enters KVM_RUN when it fails with EAGAIN, which
KVM returns to an application processor's first KVM_RUN after the INIT/SIPI that starts it.
This module never touches guest memory; it reads the bytes KVM copied into ``kvm_run``.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterable
from typing import Final

from vmmswap.kernel import kvm as k
from vmmswap.vm.kvm import VcpuFd

_OPCODE_INT3: Final = 0xCC
_OPCODE_FWAIT: Final = 0x9B
_VECTOR_BP: Final = 3
#: ``0F AE /2`` is LDMXCSR m32.
_GROUP15: Final = b"\x0f\xae"
_LDMXCSR_REG: Final = 2
#: What Linux's kernel_fpu_begin() loads: all SSE exceptions masked, round to nearest.
MXCSR_DEFAULT: Final = 0x1F80


def modrm_operand_length(rest: bytes) -> int:
    """Bytes taken by a ModRM byte and its SIB/displacement (64-bit addressing), from ``rest``.

    ValueError if ``rest`` is too short or the form is a register operand (mod 3).
    """
    if not rest:
        raise ValueError("no ModRM byte")
    modrm = rest[0]
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        raise ValueError("register operand")
    length = 1
    if rm == 4:  # a SIB byte follows
        if len(rest) < 2:
            raise ValueError("truncated SIB")
        length += 1
        if mod == 0 and rest[1] & 7 == 5:
            length += 4  # SIB base 5 with mod 0: disp32, no base
    elif mod == 0 and rm == 5:
        length += 4  # RIP-relative disp32
    length += {0: 0, 1: 1, 2: 4}[mod]
    if length > len(rest):
        raise ValueError("truncated displacement")
    return length


def failed_instruction(vcpu: VcpuFd) -> bytes | None:
    """The bytes of the instruction an emulation-failure exit reports, or None if absent.

    The exit's data words are ``flags``, then ``insn_size`` (one byte) followed by up to 15
    instruction bytes (``struct kvm_run.emulation_failure``).
    """
    internal = vcpu.run_state.exit.internal
    if internal.suberror != k.KVM_INTERNAL_ERROR_EMULATION or internal.ndata < 2:
        return None
    if not internal.data[0] & k.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return None
    raw = b"".join(int(internal.data[i]).to_bytes(8, "little") for i in (1, 2))
    size = raw[0]
    return raw[1:1 + min(size, 15)]


def _skip(vcpu: VcpuFd, length: int) -> None:
    regs = vcpu.get_regs()
    regs.rip += length
    vcpu.set_regs(regs)


def _inject_breakpoint(vcpu: VcpuFd) -> None:
    _skip(vcpu, 1)
    events = k.KvmVcpuEvents()
    fd = vcpu.fileno()
    try:
        fcntl.ioctl(fd, k.KVM_GET_VCPU_EVENTS, events, True)
        events.exception_injected = 1
        events.exception_nr = _VECTOR_BP
        events.exception_has_error_code = 0
        events.exception_pending = 0
        events.flags = 0
        fcntl.ioctl(fd, k.KVM_SET_VCPU_EVENTS, events, True)
    except OSError as exc:
        raise OSError(exc.errno, f"injecting #BP into vCPU {vcpu.index}: "
                                 f"{os.strerror(exc.errno or 0)}") from None


class EmulationFixups:
    """Counts what was finished for the guest, per instruction (for the report)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"int3": 0, "fwait": 0, "ldmxcsr": 0}

    def handle(self, vcpu: VcpuFd) -> bool:
        """Finish the failed instruction of ``vcpu`` if it is one of ours; False if not."""
        insn = failed_instruction(vcpu)
        if not insn:
            return False
        if insn[0] == _OPCODE_INT3:
            _inject_breakpoint(vcpu)
            name = "int3"
        elif insn[0] == _OPCODE_FWAIT:
            _skip(vcpu, 1)
            name = "fwait"
        elif insn.startswith(_GROUP15) and len(insn) > 2 and (insn[2] >> 3) & 7 == _LDMXCSR_REG:
            try:
                length = len(_GROUP15) + modrm_operand_length(insn[2:])
            except ValueError:
                return False
            fpu = vcpu.get_fpu()
            fpu.mxcsr = MXCSR_DEFAULT
            vcpu.set_fpu(fpu)
            _skip(vcpu, length)
            name = "ldmxcsr"
        else:
            return False
        with self._lock:
            self.counts[name] += 1
        return True

    def install(self, vcpus: Iterable[VcpuFd]) -> None:
        """Wrap each vCPU's ``run`` so handled failures re-enter KVM_RUN transparently."""
        for vcpu in vcpus:
            vcpu.run = self._wrap(vcpu, vcpu.run)  # type: ignore[method-assign]

    def _wrap(self, vcpu: VcpuFd, run: Callable[[], int]) -> Callable[[], int]:
        def run_with_fixups() -> int:
            while True:
                try:
                    reason = run()
                except BlockingIOError:
                    # EAGAIN: an application processor left its wait-for-SIPI state (KVM
                    # returns it once after INIT/SIPI, as QEMU's loop knows); enter again.
                    continue
                if reason != k.KVM_EXIT_INTERNAL_ERROR or not self.handle(vcpu):
                    return reason
        return run_with_fixups
