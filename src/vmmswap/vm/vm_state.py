"""The snapshot's state file: vCPU and device state of a micro-VM, versioned and validated.

A snapshot is two files, as in Firecracker: this state file and the memory file (guest memory
region after region, no header, holes where memory is zero). Restoring from a state file that
does not describe exactly the machine it was taken of would run the guest on wrong registers or
against the wrong memory map, and the guest could not tell: so loading checks everything it can
before anything is created -- the format name and version, a SHA-256 over the content, every
KVM blob's exact size (the ``struct`` sizes of :mod:`vmmswap.kernel.kvm`), the memory map
(page-aligned, disjoint, file offsets back to back), vCPU indices 0..n-1 -- and raises
:class:`VmStateError` naming the first problem.

The file is JSON (blobs base64): a few KiB per vCPU, readable with ``jq`` when a restore fails,
and portable across Python versions, unlike pickle (which would also execute code on load).
KVM structs are kept as raw bytes: they go back through the same ioctl they came out of, and
KVM itself validates their contents on the way in.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Final

from vmmswap.kernel import kvm as k
from vmmswap.kernel import kvm_state as ks

FORMAT: Final = "vmmswap-vm-state"
VERSION: Final = 1
#: A state file larger than this is refused unread (a real one is a few KiB per vCPU).
MAX_STATE_BYTES: Final = 16 << 20
_PAGE: Final = 4096

_SIZES: Final = {
    "regs": ctypes.sizeof(k.KvmRegs),
    "sregs": ctypes.sizeof(k.KvmSregs),
    "fpu": ctypes.sizeof(k.KvmFpu),
    "xcrs": ctypes.sizeof(ks.KvmXcrs),
    "events": ctypes.sizeof(k.KvmVcpuEvents),
    "lapic": ctypes.sizeof(k.KvmLapicState),
    "irqchip": ctypes.sizeof(ks.KvmIrqchip),
    "pit": ctypes.sizeof(ks.KvmPitState2),
}


class VmStateError(ValueError):
    """A state file is unreadable, of another format or version, corrupt or inconsistent."""


@dataclass
class VcpuState:
    """One vCPU: raw KVM structs as KVM_GET_* returned them, plus MSRs and the MP state.

    ``xsave`` is the XSAVE area when KVM has KVM_CAP_XSAVE (then ``fpu`` is None), else
    ``fpu`` holds ``struct kvm_fpu``. ``lapic`` exists only with an in-kernel irqchip.
    """

    index: int
    regs: bytes
    sregs: bytes
    events: bytes
    mp_state: int
    msrs: dict[int, int] = field(default_factory=dict)
    xsave: bytes | None = None
    fpu: bytes | None = None
    xcrs: bytes | None = None
    lapic: bytes | None = None


@dataclass
class MemoryRegionState:
    """A guest-memory region and where its bytes are in the memory file."""

    guest_addr: int
    size: int
    file_offset: int


@dataclass
class VmState:
    """Everything a restore needs besides guest memory.

    ``guest`` is what the VMM's devices need to be rebuilt (for the built-in guest: its memory
    size, region count and the checksums recorded at snapshot time); it is JSON, free-form
    for this module, checked by whoever reads it.
    """

    regions: list[MemoryRegionState]
    vcpus: list[VcpuState]
    page_size: int = _PAGE
    clock_ns: int | None = None
    tsc_khz: int = 0
    irqchips: list[bytes] | None = None
    pit: bytes | None = None
    guest: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_size(self) -> int:
        return sum(r.size for r in self.regions)


# --- writing -------------------------------------------------------------------------------------
def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _body(state: VmState) -> dict[str, Any]:
    return {
        "page_size": state.page_size,
        "regions": [{"guest_addr": r.guest_addr, "size": r.size, "file_offset": r.file_offset}
                    for r in state.regions],
        "clock_ns": state.clock_ns,
        "tsc_khz": state.tsc_khz,
        "irqchips": None if state.irqchips is None else [_b64(c) for c in state.irqchips],
        "pit": _b64(state.pit),
        "vcpus": [{
            "index": v.index, "regs": _b64(v.regs), "sregs": _b64(v.sregs),
            "events": _b64(v.events), "mp_state": v.mp_state,
            "msrs": {f"{index:#x}": value for index, value in sorted(v.msrs.items())},
            "xsave": _b64(v.xsave), "fpu": _b64(v.fpu), "xcrs": _b64(v.xcrs),
            "lapic": _b64(v.lapic),
        } for v in state.vcpus],
        "guest": state.guest,
    }


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def encode_state(state: VmState) -> bytes:
    """The state file's bytes (validated first: a file this writes always loads)."""
    body = _body(state)
    doc = {"format": FORMAT, "version": VERSION, "sha256": _digest(body), "state": body}
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    decode_state(data)
    return data


def save_state(path: str, state: VmState) -> None:
    """Write the state file atomically (a crash leaves the old file or none, never half)."""
    data = encode_state(state)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --- reading -------------------------------------------------------------------------------------
def _int(obj: dict[str, Any], name: str, where: str, *, bits: int = 64,
         optional: bool = False) -> int | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise VmStateError(f"{where}: {name} must be an unsigned {bits}-bit integer, "
                           f"got {value!r}")
    return value


def _blob(obj: dict[str, Any], name: str, where: str, size: int | None = None, *,
          optional: bool = False) -> bytes | None:
    value = obj.get(name)
    if value is None:
        if optional:
            return None
        raise VmStateError(f"{where}: {name} is missing")
    if not isinstance(value, str):
        raise VmStateError(f"{where}: {name} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:
        raise VmStateError(f"{where}: {name} is not valid base64") from None
    want = size if size is not None else _SIZES.get(name)
    if want is not None and len(data) != want:
        raise VmStateError(f"{where}: {name} is {len(data)} bytes, struct needs {want}")
    return data


def _need(data: bytes | None) -> bytes:
    assert data is not None
    return data


def _vcpu(obj: object, position: int) -> VcpuState:
    where = f"vcpu {position}"
    if not isinstance(obj, dict):
        raise VmStateError(f"{where} is not a JSON object")
    index = _int(obj, "index", where, bits=32)
    if index != position:
        raise VmStateError(f"{where}: index {index} out of order (vCPUs must be 0..n-1)")
    msrs_doc = obj.get("msrs")
    if not isinstance(msrs_doc, dict):
        raise VmStateError(f"{where}: msrs must be an object of hex index -> value")
    msrs: dict[int, int] = {}
    for key, value in msrs_doc.items():
        try:
            msr = int(key, 16)
        except ValueError:
            raise VmStateError(f"{where}: MSR index {key!r} is not hex") from None
        if not 0 <= msr < 1 << 32 or isinstance(value, bool) or not isinstance(value, int) \
                or not 0 <= value < 1 << 64:
            raise VmStateError(f"{where}: MSR {key} = {value!r} out of range")
        msrs[msr] = value
    xsave = _blob(obj, "xsave", where, optional=True)
    fpu = _blob(obj, "fpu", where, optional=True)
    if (xsave is None) == (fpu is None):
        raise VmStateError(f"{where}: exactly one of xsave and fpu must be present")
    if xsave is not None and (len(xsave) < ctypes.sizeof(ks.KvmXsave) or len(xsave) % 4):
        raise VmStateError(f"{where}: xsave is {len(xsave)} bytes, needs at least "
                           f"{ctypes.sizeof(ks.KvmXsave)} in whole u32s")
    mp_state = _int(obj, "mp_state", where, bits=32)
    assert mp_state is not None
    return VcpuState(
        index=position, regs=_need(_blob(obj, "regs", where)),
        sregs=_need(_blob(obj, "sregs", where)), events=_need(_blob(obj, "events", where)),
        mp_state=mp_state, msrs=msrs, xsave=xsave, fpu=fpu,
        xcrs=_blob(obj, "xcrs", where, optional=True),
        lapic=_blob(obj, "lapic", where, optional=True))


def _regions(body: dict[str, Any], page_size: int) -> list[MemoryRegionState]:
    docs = body.get("regions")
    if not isinstance(docs, list) or not docs:
        raise VmStateError("regions must be a non-empty list")
    regions: list[MemoryRegionState] = []
    offset = 0
    for i, obj in enumerate(docs):
        where = f"region {i}"
        if not isinstance(obj, dict):
            raise VmStateError(f"{where} is not a JSON object")
        addr, size, file_offset = (_int(obj, n, where) for n in
                                   ("guest_addr", "size", "file_offset"))
        assert addr is not None and size is not None and file_offset is not None
        if size == 0 or addr % page_size or size % page_size:
            raise VmStateError(f"{where}: {addr:#x}+{size:#x} is not a non-empty range of "
                               f"{page_size}-byte pages")
        if file_offset != offset:
            raise VmStateError(f"{where}: file offset {file_offset:#x}, but the memory file "
                               f"holds regions back to back (expected {offset:#x})")
        if regions and addr < regions[-1].guest_addr + regions[-1].size:
            raise VmStateError(f"{where} at {addr:#x} overlaps or precedes region {i - 1}")
        regions.append(MemoryRegionState(addr, size, file_offset))
        offset += size
    return regions


def decode_state(data: bytes) -> VmState:
    """Parse and validate a state file's bytes; :class:`VmStateError` on any problem."""
    if len(data) > MAX_STATE_BYTES:
        raise VmStateError(f"state file is {len(data)} bytes, more than {MAX_STATE_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VmStateError(f"state file is not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise VmStateError(f"not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise VmStateError(f"state file version {doc.get('version')!r}; this vmmswap reads "
                           f"version {VERSION}")
    body = doc.get("state")
    if not isinstance(body, dict):
        raise VmStateError("state file has no state object")
    if doc.get("sha256") != _digest(body):
        raise VmStateError("state file is corrupt: its SHA-256 does not match its content")
    page_size = _int(body, "page_size", "state")
    if page_size not in (_PAGE, 2 << 20):
        raise VmStateError(f"page size {page_size} is neither 4 KiB nor 2 MiB")
    assert page_size is not None
    vcpus_doc = body.get("vcpus")
    if not isinstance(vcpus_doc, list) or not vcpus_doc:
        raise VmStateError("vcpus must be a non-empty list")
    chips_doc = body.get("irqchips")
    irqchips: list[bytes] | None = None
    if chips_doc is not None:
        if not isinstance(chips_doc, list) or len(chips_doc) != ks.KVM_NR_IRQCHIPS:
            raise VmStateError(f"irqchips must list the {ks.KVM_NR_IRQCHIPS} in-kernel chips")
        irqchips = [_need(_blob({"irqchip": c}, "irqchip", f"irqchip {i}"))
                    for i, c in enumerate(chips_doc)]
    guest = body.get("guest")
    if not isinstance(guest, dict):
        raise VmStateError("guest must be a JSON object")
    tsc_khz = _int(body, "tsc_khz", "state", bits=32)
    assert tsc_khz is not None
    return VmState(
        regions=_regions(body, page_size),
        vcpus=[_vcpu(obj, i) for i, obj in enumerate(vcpus_doc)],
        page_size=page_size, clock_ns=_int(body, "clock_ns", "state", optional=True),
        tsc_khz=tsc_khz, irqchips=irqchips, pit=_blob(body, "pit", "state", optional=True),
        guest=guest)


def load_state(path: str) -> VmState:
    """Read and validate a state file (see :func:`decode_state`)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except OSError as err:
        raise VmStateError(f"cannot read state file {path}: {err.strerror}") from None
    try:
        return decode_state(data)
    except VmStateError as err:
        raise VmStateError(f"{path}: {err}") from None
