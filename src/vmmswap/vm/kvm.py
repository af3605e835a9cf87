"""Thin wrappers over the three KVM file descriptors: the system, a VM and a vCPU.

Each method is one ioctl (numbers and layouts in :mod:`vmmswap.kernel.kvm`). Failures raise the
``OSError`` subclass of the errno with the ioctl named in the message. None of these calls reads
guest memory from Python; ``KVM_RUN`` is issued with an integer argument, for which
``fcntl.ioctl`` releases the GIL, so a vCPU that faults on userfaultfd-registered guest memory
blocks only its own thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from types import TracebackType
from typing import Self

from vmmswap.kernel import kvm as k
from vmmswap.kernel import kvm_state as ks
from vmmswap.kernel import libc

DEFAULT_KVM_PATH = "/dev/kvm"


class KvmUnavailableError(OSError):
    """KVM cannot be used on this machine; the message says what to change."""


def _ioctl(fd: int, request: int,
           arg: (int | ctypes.Structure | ctypes.Array[ctypes.c_char]
                 | ctypes.Array[ctypes.c_uint32] | ctypes.c_uint64),
           what: str) -> int:
    try:
        if isinstance(arg, int):
            if arg > 0x7FFF_FFFF:
                # fcntl.ioctl takes a C int; addresses such as KVM_SET_TSS_ADDR's need a long.
                ret = int(libc.libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg)))
                if ret < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
                return ret
            return fcntl.ioctl(fd, request, arg)
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: {os.strerror(exc.errno or 0)}") from None


def _unavailable(path: str, exc: OSError) -> KvmUnavailableError:
    err = exc.errno or errno.EIO
    if err == errno.ENOENT:
        hint = ("the device does not exist: load the kvm_intel or kvm_amd module, enable "
                "virtualization (VT-x/AMD-V) in firmware, or enable nested virtualization if "
                "this is itself a VM")
    elif err in (errno.EACCES, errno.EPERM):
        hint = ("permission denied: run as root or add this user to the group owning "
                f"{path} (usually 'kvm'), then log in again")
    elif err in (errno.ENXIO, errno.ENODEV):
        hint = "the device exists but no KVM driver is bound to it (is kvm_intel/kvm_amd loaded?)"
    else:
        hint = os.strerror(err)
    return KvmUnavailableError(err, f"KVM is not usable at {path}: {hint}")


class Kvm:
    """The open ``/dev/kvm``: capability checks, supported CPUID, VM creation."""

    def __init__(self, path: str = DEFAULT_KVM_PATH) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _unavailable(path, exc) from None
        try:
            version = _ioctl(self._fd, k.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        except OSError as exc:
            os.close(self._fd)
            raise _unavailable(path, exc) from None
        if version != k.KVM_API_VERSION:
            os.close(self._fd)
            raise KvmUnavailableError(
                errno.ENOTSUP,
                f"KVM at {path} speaks API version {version}, this VMM needs "
                f"{k.KVM_API_VERSION}",
            )

    def fileno(self) -> int:
        return self._fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when unsupported, else a capability-specific value."""
        return _ioctl(self._fd, k.KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self._fd, k.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[k.KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until the kernel's table fits."""
        nent = 128
        while True:
            cpuid = k.kvm_cpuid2(nent)()
            cpuid.nent = nent
            try:
                _ioctl(self._fd, k.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
            except OSError as exc:
                if exc.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            entries = cpuid.entries
            count = int(cpuid.nent)
            return [k.KvmCpuidEntry2.from_buffer_copy(entries[i]) for i in range(count)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        header = k.KvmMsrListHeader(nmsrs=0)
        try:
            _ioctl(self._fd, k.KVM_GET_MSR_INDEX_LIST, header, "KVM_GET_MSR_INDEX_LIST")
        except OSError as exc:
            if exc.errno != errno.E2BIG:
                raise
        count = int(header.nmsrs)
        buf = (ctypes.c_uint32 * (count + 1))(count)
        _ioctl(self._fd, k.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
        return [int(buf[1 + i]) for i in range(int(buf[0]))]

    def create_vm(self) -> VmFd:
        """KVM_CREATE_VM with the default machine type."""
        fd = _ioctl(self._fd, k.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        os.set_inheritable(fd, False)
        return VmFd(self, fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def kvm_flavour() -> str:
    """Which KVM backend is loaded: "kvm_intel", "kvm_amd", "kvm_pvm" or "unknown".

    PVM is a software KVM (no VT-x/AMD-V needed) that runs guest user code natively but emulates
    guest-supervisor code; the numbers a guest measures depend heavily on which one runs it.
    """
    for module in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if os.path.isdir(f"/sys/module/{module}"):
            return module
    return "unknown"


def kvm_unavailable_reason(path: str = DEFAULT_KVM_PATH) -> str | None:
    """Why KVM cannot be used here, or None when it can (for test skips and CLI errors)."""
    try:
        with Kvm(path):
            return None
    except KvmUnavailableError as exc:
        return str(exc)


class VmFd:
    """A VM: memory slots, the in-kernel interrupt controllers, vCPU creation."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (answers for this VM's type)."""
        return _ioctl(self._fd, k.KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: back ``[guest_addr, +size)`` by host memory.

        **Safety**: ``[host_addr, +size)`` must stay mapped for the VM's lifetime; KVM reads and
        writes it on the guest's behalf.
        """
        region = k.KvmUserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=guest_addr,
                                            memory_size=size, userspace_addr=host_addr)
        _ioctl(self._fd, k.KVM_SET_USER_MEMORY_REGION, region,
               f"KVM_SET_USER_MEMORY_REGION(slot {slot}, guest {guest_addr:#x}+{size:#x})")

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per 4 KiB page of the ``size``-byte slot (little-endian
        bit order within u64 words), set for pages the guest wrote since the last call; the
        slot must have been created with KVM_MEM_LOG_DIRTY_PAGES."""
        pages = size // 4096
        bitmap = (ctypes.c_uint64 * max(1, (pages + 63) // 64))()
        log = ks.KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl(self._fd, ks.KVM_GET_DIRTY_LOG, log, f"KVM_GET_DIRTY_LOG(slot {slot})")
        return bytes(bitmap)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self._fd, k.KVM_SET_TSS_ADDR, addr, f"KVM_SET_TSS_ADDR({addr:#x})")

    def set_identity_map_addr(self, addr: int) -> None:
        value = ctypes.c_uint64(addr)
        _ioctl(self._fd, k.KVM_SET_IDENTITY_MAP_ADDR, value,
               f"KVM_SET_IDENTITY_MAP_ADDR({addr:#x})")

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs (before any vCPU)."""
        _ioctl(self._fd, k.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = k.KVM_PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 timer (after the irqchip)."""
        config = k.KvmPitConfig(flags=flags)
        _ioctl(self._fd, k.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive an in-kernel irqchip input (GSI) high or low."""
        value = k.KvmIrqLevel(irq=irq, level=level)
        _ioctl(self._fd, k.KVM_IRQ_LINE, value, f"KVM_IRQ_LINE({irq}, {level})")

    def irqfd(self, eventfd: int, gsi: int, flags: int = 0) -> None:
        """KVM_IRQFD: raise ``gsi`` whenever ``eventfd`` is signalled."""
        value = k.KvmIrqfd(fd=eventfd, gsi=gsi, flags=flags)
        _ioctl(self._fd, k.KVM_IRQFD, value, f"KVM_IRQFD(gsi {gsi})")

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: one in-kernel controller's state (``struct kvm_irqchip``)."""
        chip = ks.KvmIrqchip(chip_id=chip_id)
        _ioctl(self._fd, ks.KVM_GET_IRQCHIP, chip, f"KVM_GET_IRQCHIP({chip_id})")
        return bytes(chip)

    def set_irqchip(self, raw: bytes) -> None:
        """KVM_SET_IRQCHIP with a ``struct kvm_irqchip`` as :meth:`get_irqchip` returned it."""
        chip = ks.KvmIrqchip.from_buffer_copy(raw)
        _ioctl(self._fd, ks.KVM_SET_IRQCHIP, chip, f"KVM_SET_IRQCHIP({chip.chip_id})")

    def get_pit2(self) -> bytes:
        state = ks.KvmPitState2()
        _ioctl(self._fd, ks.KVM_GET_PIT2, state, "KVM_GET_PIT2")
        return bytes(state)

    def set_pit2(self, raw: bytes) -> None:
        _ioctl(self._fd, ks.KVM_SET_PIT2, ks.KvmPitState2.from_buffer_copy(raw), "KVM_SET_PIT2")

    def get_clock(self) -> k.KvmClockData:
        """KVM_GET_CLOCK: the VM's kvmclock (ns), for a restored guest to continue from."""
        data = k.KvmClockData()
        _ioctl(self._fd, k.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return data

    def set_clock(self, clock_ns: int) -> None:
        data = k.KvmClockData(clock=clock_ns)
        _ioctl(self._fd, k.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    def xsave_size(self) -> int:
        """Bytes of a vCPU's XSAVE area: KVM_CAP_XSAVE2's answer, else the fixed 4 KiB;
        0 without KVM_CAP_XSAVE (then KVM_GET_FPU is the FPU state)."""
        if not self.check_extension(k.KVM_CAP_XSAVE):
            return 0
        return max(self.check_extension(ks.KVM_CAP_XSAVE2), ctypes.sizeof(ks.KvmXsave))

    def create_vcpu(self, index: int) -> VcpuFd:
        """KVM_CREATE_VCPU with APIC id ``index``, and the mmap of its kvm_run area."""
        fd = _ioctl(self._fd, k.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU({index})")
        os.set_inheritable(fd, False)
        try:
            return VcpuFd(index, fd, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class VcpuFd:
    """A vCPU: its registers, CPUID, and KVM_RUN with the exit in :attr:`run_state`.

    :attr:`run_state` is the ``struct kvm_run`` mmap, not guest memory: reading it from Python
    never faults on userfaultfd-registered memory.
    """

    def __init__(self, index: int, fd: int, mmap_size: int) -> None:
        self.index = index
        self._fd = fd
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_state = k.KvmRun.from_buffer(self._mmap)

    def fileno(self) -> int:
        return self._fd

    def run(self) -> int:
        """KVM_RUN (GIL released); returns ``run_state.exit_reason``.

        Raises InterruptedError when a signal arrived or ``immediate_exit`` was set: the
        caller decides whether to re-enter.
        """
        try:
            fcntl.ioctl(self._fd, k.KVM_RUN, 0)
        except InterruptedError:
            raise
        except OSError as exc:
            raise OSError(exc.errno, f"KVM_RUN on vCPU {self.index}: "
                                     f"{os.strerror(exc.errno or 0)}") from None
        return int(self.run_state.exit_reason)

    def pio_data(self, offset: int, length: int) -> memoryview:
        """The port-I/O data bytes of an exit (they live inside the kvm_run mmap)."""
        return memoryview(self._mmap)[offset:offset + length]

    def get_regs(self) -> k.KvmRegs:
        regs = k.KvmRegs()
        _ioctl(self._fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: k.KvmRegs) -> None:
        _ioctl(self._fd, k.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> k.KvmSregs:
        sregs = k.KvmSregs()
        _ioctl(self._fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: k.KvmSregs) -> None:
        _ioctl(self._fd, k.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> k.KvmFpu:
        fpu = k.KvmFpu()
        _ioctl(self._fd, k.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: k.KvmFpu) -> None:
        _ioctl(self._fd, k.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_cpuid2(self, entries: list[k.KvmCpuidEntry2]) -> None:
        cpuid = k.kvm_cpuid2(len(entries))()
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        _ioctl(self._fd, k.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = k.kvm_msrs(len(indices))()
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        done = _ioctl(self._fd, k.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        return {int(msrs.entries[i].index): int(msrs.entries[i].data)
                for i in range(done)}

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = k.kvm_msrs(len(values))()
        msrs.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        done = _ioctl(self._fd, k.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if done != len(values):
            bad = list(values)[done]
            raise OSError(errno.EINVAL, f"KVM_SET_MSRS: MSR {bad:#x} was refused")

    def get_mp_state(self) -> int:
        state = k.KvmMpState()
        _ioctl(self._fd, k.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self._fd, k.KVM_SET_MP_STATE, k.KvmMpState(mp_state=mp_state), "KVM_SET_MP_STATE")

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the in-kernel local APIC's 1 KiB register page."""
        state = k.KvmLapicState()
        _ioctl(self._fd, k.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        return ctypes.string_at(ctypes.addressof(state), ctypes.sizeof(state))

    def set_lapic(self, regs: bytes) -> None:
        """KVM_SET_LAPIC with a register page as :meth:`get_lapic` returns it."""
        state = k.KvmLapicState()
        ctypes.memmove(ctypes.addressof(state), regs, min(len(regs), ctypes.sizeof(state)))
        _ioctl(self._fd, k.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")

    def get_xsave(self, size: int) -> bytes:
        """KVM_GET_XSAVE2 (or KVM_GET_XSAVE for the fixed 4 KiB): the XSAVE area."""
        fixed = ctypes.sizeof(ks.KvmXsave)
        buf = (ctypes.c_char * max(size, fixed))()
        if size > fixed:
            _ioctl(self._fd, ks.KVM_GET_XSAVE2, buf, "KVM_GET_XSAVE2")
        else:
            _ioctl(self._fd, ks.KVM_GET_XSAVE, buf, "KVM_GET_XSAVE")
        return bytes(buf)

    def set_xsave(self, raw: bytes) -> None:
        """KVM_SET_XSAVE (KVM reads as many bytes as KVM_CAP_XSAVE2 reports)."""
        buf = (ctypes.c_char * len(raw)).from_buffer_copy(raw)
        _ioctl(self._fd, ks.KVM_SET_XSAVE, buf, "KVM_SET_XSAVE")

    def get_xcrs(self) -> bytes:
        xcrs = ks.KvmXcrs()
        _ioctl(self._fd, ks.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        return bytes(xcrs)

    def set_xcrs(self, raw: bytes) -> None:
        _ioctl(self._fd, ks.KVM_SET_XCRS, ks.KvmXcrs.from_buffer_copy(raw), "KVM_SET_XCRS")

    def get_vcpu_events(self) -> bytes:
        events = k.KvmVcpuEvents()
        _ioctl(self._fd, k.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return bytes(events)

    def set_vcpu_events(self, raw: bytes) -> None:
        _ioctl(self._fd, k.KVM_SET_VCPU_EVENTS, k.KvmVcpuEvents.from_buffer_copy(raw),
               "KVM_SET_VCPU_EVENTS")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest's TSC frequency, to turn rdtsc deltas into time."""
        return _ioctl(self._fd, k.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def close(self) -> None:
        if self._fd < 0:
            return
        del self.run_state
        # A pio_data view may still be alive; then the mapping goes with the object.
        with contextlib.suppress(BufferError):
            self._mmap.close()
        os.close(self._fd)
        self._fd = -1
