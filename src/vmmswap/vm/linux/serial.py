"""A 16550A UART (the PC's 8250 family) on port I/O: the Linux guest's console.

What the kernel's 8250 driver needs to detect a 16550A and run it on interrupts is modelled:
the scratch and loopback probes, the FIFO bits of IIR, the THR-empty interrupt that fires as soon
as it is enabled (the driver tests exactly that at startup), and received data. Transmission is
instant: every byte written to THR is handed to ``on_output`` and THR is empty again at once, so
LSR always reports THRE|TEMT. Received bytes are queued without limit (no overrun), since the
host, not a wire, is the other end.

Interrupts go out through ``set_irq(level)``, called only when the level changes; with KVM's
in-kernel irqchip that is ``KVM_IRQ_LINE(4, level)`` for COM1. The line is modelled as always
gated on (the PC's OUT2 gate is not), as most VMMs do.

The model is thread-safe: vCPU threads run ``io_in``/``io_out`` while a host thread calls
:meth:`Uart16550.feed`. It never touches guest memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Final

COM1_BASE: Final = 0x3F8
COM1_IRQ: Final = 4
PORT_COUNT: Final = 8

# Register offsets.
RBR_THR_DLL: Final = 0
IER_DLM: Final = 1
IIR_FCR: Final = 2
LCR: Final = 3
MCR: Final = 4
LSR: Final = 5
MSR: Final = 6
SCR: Final = 7

IER_RDI: Final = 0x01  # received data available
IER_THRI: Final = 0x02  # transmitter holding register empty
IER_RLSI: Final = 0x04  # receiver line status
IER_MSI: Final = 0x08  # modem status
IER_MASK: Final = 0x0F

IIR_NO_INT: Final = 0x01
IIR_MSI: Final = 0x00
IIR_THRI: Final = 0x02
IIR_RDI: Final = 0x04
IIR_ID_MASK: Final = 0x0E
IIR_FIFO_ENABLED: Final = 0xC0

FCR_ENABLE_FIFO: Final = 0x01
FCR_CLEAR_RCVR: Final = 0x02

LCR_DLAB: Final = 0x80

MCR_DTR: Final = 0x01
MCR_RTS: Final = 0x02
MCR_OUT1: Final = 0x04
MCR_OUT2: Final = 0x08
MCR_LOOP: Final = 0x10
MCR_MASK: Final = 0x1F

LSR_DR: Final = 0x01
LSR_THRE: Final = 0x20
LSR_TEMT: Final = 0x40

MSR_DCTS: Final = 0x01
MSR_DDSR: Final = 0x02
MSR_TERI: Final = 0x04
MSR_DDCD: Final = 0x08
MSR_DELTAS: Final = 0x0F
MSR_CTS: Final = 0x10
MSR_DSR: Final = 0x20
MSR_RI: Final = 0x40
MSR_DCD: Final = 0x80

#: With no loopback, the "modem" is always there and ready: CTS, DSR and carrier.
_MSR_CONNECTED: Final = MSR_CTS | MSR_DSR | MSR_DCD


class Uart16550:
    """One UART at ``base`` (8 ports)."""

    def __init__(self, on_output: Callable[[bytes], None], set_irq: Callable[[bool], None],
                 base: int = COM1_BASE) -> None:
        self.base = base
        self._on_output = on_output
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._ier = 0
        self._fcr = 0
        self._lcr = 0
        self._mcr = MCR_OUT2
        self._scr = 0
        self._dll = 0x0C  # 9600 baud until the driver programs its own divisor
        self._dlm = 0
        self._msr = _MSR_CONNECTED
        self._thr_pending = False
        self._irq_level = False

    @property
    def ports(self) -> range:
        return range(self.base, self.base + PORT_COUNT)

    # --- snapshot -------------------------------------------------------------------------------

    _STATE_FIELDS: Final = ("ier", "fcr", "lcr", "mcr", "scr", "dll", "dlm", "msr")

    def state(self) -> dict[str, object]:
        """The registers, queued input and interrupt state, as JSON (for a VM snapshot)."""
        with self._lock:
            out: dict[str, object] = {name: getattr(self, f"_{name}")
                                      for name in self._STATE_FIELDS}
            out.update(rx=list(self._rx), thr_pending=self._thr_pending,
                       irq_level=self._irq_level)
            return out

    def load_state(self, state: dict[str, object]) -> None:
        """Take a :meth:`state` back (before the guest runs; the irqchip's line level is
        restored with the irqchip, so the line is not driven here). ValueError if malformed."""
        def byte(value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 256:
                raise ValueError(f"malformed UART state: {value!r} is not a register byte")
            return value

        raw_rx = state.get("rx")
        if not isinstance(raw_rx, list):
            raise ValueError("malformed UART state: rx must be a list of bytes")
        values = {name: byte(state.get(name)) for name in self._STATE_FIELDS}
        rx = [byte(b) for b in raw_rx]
        thr, level = bool(state.get("thr_pending")), bool(state.get("irq_level"))
        with self._lock:
            for name, value in values.items():
                setattr(self, f"_{name}", value)
            self._rx = deque(rx)
            self._thr_pending = thr
            self._irq_level = level

    # --- the host side ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to receive (as if typed on the console)."""
        if not data:
            return
        with self._lock:
            self._rx.extend(data)
            self._update_irq()

    def pending_input(self) -> int:
        """Bytes queued for the guest that it has not read yet."""
        with self._lock:
            return len(self._rx)

    # --- the guest side (port I/O exits) ------------------------------------------------------

    def io_in(self, port: int, size: int) -> int:
        """A guest ``in`` from one of :attr:`ports`; wider accesses read one register."""
        with self._lock:
            return self._read(port - self.base)

    def io_out(self, port: int, size: int, value: int) -> None:
        """A guest ``out`` to one of :attr:`ports` (only the low byte is a register write)."""
        output = None
        with self._lock:
            output = self._write(port - self.base, value & 0xFF)
        if output is not None:
            # Outside the lock: the host's sink may be slow (a terminal, a file).
            self._on_output(output)

    def _read(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self._dll
            value = self._rx.popleft() if self._rx else 0
            self._update_irq()
            return value
        if offset == IER_DLM:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & IIR_ID_MASK == IIR_THRI:
                # Reading IIR while it names THR-empty acknowledges that interrupt.
                self._thr_pending = False
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE_FIFO else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            value = self._modem_status()
            self._msr &= ~MSR_DELTAS  # reading MSR clears the delta bits
            self._update_irq()
            return value
        if offset == SCR:
            return self._scr
        return 0xFF

    def _write(self, offset: int, value: int) -> bytes | None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self._dll = value
                return None
            # Sent at once: THR is empty again, and says so if the driver asked to know.
            self._thr_pending = True
            self._update_irq()
            if self._mcr & MCR_LOOP:
                self._rx.append(value)
                self._update_irq()
                return None
            return bytes((value,))
        if offset == IER_DLM:
            if dlab:
                self._dlm = value
                return None
            changed = (self._ier ^ value) & IER_MASK
            self._ier = value & IER_MASK
            if changed & IER_THRI:
                # Enabling the THR-empty interrupt with THR empty raises it immediately.
                self._thr_pending = bool(self._ier & IER_THRI)
            self._update_irq()
        elif offset == IIR_FCR:
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
            self._fcr = value & ~(FCR_CLEAR_RCVR | 0x04)
            self._update_irq()
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & MCR_MASK
            self._update_irq()
        elif offset == SCR:
            self._scr = value
        return None

    def _modem_status(self) -> int:
        if self._mcr & MCR_LOOP:
            # Loopback wires the outputs back: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
            mcr = self._mcr
            return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0)
                    | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0)
                    | (self._msr & MSR_DELTAS))
        return self._msr

    def _iir(self) -> int:
        """The highest-priority pending interrupt, as IIR's low nibble."""
        if self._ier & IER_RDI and self._rx:
            return IIR_RDI
        if self._ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        if self._ier & IER_MSI and self._msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._iir() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)
