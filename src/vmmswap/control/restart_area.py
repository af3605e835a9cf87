"""The control area: what a successor monitor needs to know of its dead predecessor's commands.

The data plane keeps every page's whereabouts in the page-state memfd, which the VMM holds for
its whole life (``vmmswap.dataplane.page_state.PageState``); its first 4096 bytes (``.control``)
belong to the control plane, and this module defines them. The monitor rewrites the area at
every state change, *before* the change takes effect where a death in between matters (enable
records "moving" before the first page leaves guest memory), so a successor reading it after a
SIGKILL at any instant finds either the state before a step or the state after it.

Two slots of 2048 bytes; each write goes to the slot *not* holding the newest record and ends
with a CRC32 over the slot, so a monitor killed in the middle of a write (SIGKILL can land
between any two stores) leaves the previous record readable. A slot's layout (little-endian,
version :data:`LAYOUT_VERSION`; a successor refuses any other)::

    0   u32  magic "VMSC"
    4   u16  layout version
    6   u16  bytes used (header + error text)
    8   u64  writes (incremented by every write: a successor can tell a fresh area)
    16  u8   swap state (crosvm's code, SwapState.code)
    17  u8   enable phase (EnablePhase)
    18  u8   state before the enable (its code; meaningful while the phase is not NONE)
    19  u8   flags (FLAG_SLOW_CLEANUP: the last disable asked for a gradual file cleanup;
             FLAG_CLEANUP_PENDING: that cleanup has not finished)
    20  u32  restarts so far
    24  u64  pages of the running or last transition
    32  f64  seconds from the last death to the successor serving (0: none yet)
    40  u16  length of the error text, then the UTF-8 text (at most MAX_ERROR bytes)
    2044 u32 CRC32 of bytes 0..2043

One writer at a time: the monitor, on its single thread. Nothing in the area is ever trusted
for a page's data -- that is the data plane's state -- only for which command was running.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from vmmswap.control.status import SwapState

MAGIC: Final = b"VMSC"
LAYOUT_VERSION: Final = 1
AREA_SIZE: Final = 4096
_HEADER: Final = struct.Struct("<4sHHQBBBBIQdH")
SLOT_SIZE: Final = AREA_SIZE // 2
_CRC: Final = struct.Struct("<I")
_CRC_AT: Final = SLOT_SIZE - _CRC.size
MAX_ERROR: Final = 1024
FLAG_SLOW_CLEANUP: Final = 1
FLAG_CLEANUP_PENDING: Final = 2


class RestartAreaError(ValueError):
    """The control area is not one this monitor can resume from (wrong magic or version)."""


class EnablePhase(enum.IntEnum):
    """How far an enable got. A successor that finds STARTING knows no page moved yet (the
    handler may exist, registrations may be partial); MOVING means pages may have left guest
    memory, so the enable's result (state Pending) must stand."""

    NONE = 0
    STARTING = 1
    MOVING = 2


@dataclass(frozen=True, slots=True)
class AreaRecord:
    """One reading of the area."""

    state: SwapState = SwapState.READY
    enable_phase: EnablePhase = EnablePhase.NONE
    prior_state: SwapState = SwapState.READY
    flags: int = 0
    restarts: int = 0
    transition_pages: int = 0
    last_resume_seconds: float = 0.0
    error: str | None = None
    writes: int = 0

    @property
    def slow_cleanup(self) -> bool:
        return bool(self.flags & FLAG_SLOW_CLEANUP)

    @property
    def cleanup_pending(self) -> bool:
        return bool(self.flags & FLAG_CLEANUP_PENDING)


class RestartArea:
    """The area over a writable 4096-byte buffer (the page state's ``control`` view)."""

    def __init__(self, view: memoryview) -> None:
        if view.nbytes < AREA_SIZE or view.readonly:
            raise RestartAreaError(f"the control area needs {AREA_SIZE} writable bytes, got "
                                   f"{view.nbytes}{' (read-only)' if view.readonly else ''}")
        self._view = view.cast("B")[:AREA_SIZE]
        self._writes = 0

    @property
    def blank(self) -> bool:
        """Never written (a fresh memfd reads as zeros)."""
        return not any(self._view)

    def _slot(self, index: int) -> AreaRecord | None:
        """The record in slot ``index``, None if it is blank or torn (CRC mismatch)."""
        slot = self._view[index * SLOT_SIZE:(index + 1) * SLOT_SIZE]
        (crc,) = _CRC.unpack_from(slot, _CRC_AT)
        if not any(slot) or zlib.crc32(slot[:_CRC_AT]) != crc:
            return None
        (magic, version, _used, writes, state, phase, prior, flags, restarts, pages, resume,
         err_len) = _HEADER.unpack_from(slot, 0)
        if magic != MAGIC:
            raise RestartAreaError(f"the control area's magic is {magic!r}, not {MAGIC!r}")
        if version != LAYOUT_VERSION:
            raise RestartAreaError(f"control area layout {version}; this monitor reads "
                                   f"{LAYOUT_VERSION}")
        if err_len > MAX_ERROR:
            raise RestartAreaError(f"control area error text of {err_len} bytes")
        try:
            text = bytes(slot[_HEADER.size:_HEADER.size + err_len]).decode()
            return AreaRecord(SwapState.from_code(state), EnablePhase(phase),
                              SwapState.from_code(prior), flags, restarts, pages, resume,
                              text or None, writes)
        except (ValueError, UnicodeDecodeError) as err:
            raise RestartAreaError(f"the control area does not parse: {err}") from None

    def read(self) -> AreaRecord:
        """The newest intact record; a blank area, or one whose first write was torn, reads
        as Ready with nothing running. RestartAreaError when neither slot is intact and slot 0
        is not blank (one writer at a time never leaves that)."""
        records = [r for r in (self._slot(0), self._slot(1)) if r is not None]
        if not records:
            if not any(self._view[:SLOT_SIZE]):
                # Slot 0 blank: the area's first write (which goes to slot 1) was cut short,
                # so, as after any torn write, the record before it stands -- the blank one.
                return AreaRecord()
            raise RestartAreaError("both slots of the control area are torn")
        newest = max(records, key=lambda r: r.writes)
        self._writes = max(self._writes, newest.writes)
        return newest

    def write(self, record: AreaRecord) -> None:
        """Store ``record`` in the older slot; the newer one stays intact meanwhile."""
        if self._writes == 0 and not self.blank:
            self.read()  # continue the sequence of the predecessor's writes
        self._writes += 1
        index = self._writes % 2
        slot = self._view[index * SLOT_SIZE:(index + 1) * SLOT_SIZE]
        text = (record.error or "").encode()[:MAX_ERROR]
        while True:  # never cut a multi-byte character in two
            try:
                text.decode()
                break
            except UnicodeDecodeError:
                text = text[:-1]
        _HEADER.pack_into(slot, 0, MAGIC, LAYOUT_VERSION, _HEADER.size + len(text),
                          self._writes, record.state.code, int(record.enable_phase),
                          record.prior_state.code, record.flags, record.restarts,
                          record.transition_pages, record.last_resume_seconds, len(text))
        slot[_HEADER.size:_HEADER.size + len(text)] = text
        end = _HEADER.size + len(text)
        slot[end:_CRC_AT] = bytes(_CRC_AT - end)
        _CRC.pack_into(slot, _CRC_AT, zlib.crc32(slot[:_CRC_AT]))


__all__ = [
    "AREA_SIZE",
    "AreaRecord",
    "EnablePhase",
    "RestartArea",
    "RestartAreaError",
]
