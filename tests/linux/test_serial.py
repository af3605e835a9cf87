"""The 16550A model against the probes and the interrupt protocol of Linux's 8250 driver."""

from __future__ import annotations

import pytest

from vmmswap.vm.linux import serial as s

BASE = s.COM1_BASE


class Harness:
    def __init__(self) -> None:
        self.output = bytearray()
        self.irq_changes: list[bool] = []
        self.uart = s.Uart16550(self.output.extend, self.irq_changes.append, BASE)

    def read(self, offset: int) -> int:
        return self.uart.io_in(BASE + offset, 1)

    def write(self, offset: int, value: int) -> None:
        self.uart.io_out(BASE + offset, 1, value)

    @property
    def irq(self) -> bool:
        return bool(self.irq_changes) and self.irq_changes[-1]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_ier_scratch_probe_reads_back_low_nibble(h: Harness) -> None:
    h.write(s.IER_DLM, 0)
    assert h.read(s.IER_DLM) & 0x0F == 0
    h.write(s.IER_DLM, 0x0F)
    assert h.read(s.IER_DLM) & 0x0F == 0x0F
    h.write(s.IER_DLM, 0xFF)  # the XScale UUE probe (bit 6) must not stick
    assert h.read(s.IER_DLM) == 0x0F


def test_loopback_probe_mirrors_modem_outputs(h: Harness) -> None:
    h.write(s.MCR, s.MCR_LOOP | 0x0A)
    assert h.read(s.MSR) & 0xF0 == 0x90


def test_fifo_enabled_identifies_as_16550a(h: Harness) -> None:
    h.write(s.IIR_FCR, s.FCR_ENABLE_FIFO)
    assert h.read(s.IIR_FCR) >> 6 == 3
    h.write(s.IIR_FCR, 0)
    assert h.read(s.IIR_FCR) >> 6 == 0


def test_divisor_latch_is_separate_from_data_registers(h: Harness) -> None:
    h.write(s.LCR, s.LCR_DLAB)
    h.write(s.RBR_THR_DLL, 0x01)
    h.write(s.IER_DLM, 0x00)
    h.write(s.LCR, 0x03)
    assert h.output == b""
    h.write(s.LCR, s.LCR_DLAB)
    assert (h.read(s.RBR_THR_DLL), h.read(s.IER_DLM)) == (0x01, 0x00)


def test_transmit_goes_to_output_and_lsr_stays_empty(h: Harness) -> None:
    for byte in b"ok\n":
        assert h.read(s.LSR) & s.LSR_THRE
        h.write(s.RBR_THR_DLL, byte)
    assert h.output == b"ok\n"
    assert h.read(s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT


def test_enabling_thri_raises_it_at_once_and_iir_read_acknowledges(h: Harness) -> None:
    # Linux's startup check: IER=THRI, read IIR, IER=0, IER=THRI, read IIR again.
    h.write(s.IER_DLM, s.IER_THRI)
    assert h.irq
    assert h.read(s.IIR_FCR) & 0x0F == s.IIR_THRI
    assert not h.irq
    assert h.read(s.IIR_FCR) & s.IIR_NO_INT
    h.write(s.IER_DLM, 0)
    h.write(s.IER_DLM, s.IER_THRI)
    assert h.read(s.IIR_FCR) & 0x0F == s.IIR_THRI


def test_each_transmitted_byte_raises_thri_again(h: Harness) -> None:
    h.write(s.IER_DLM, s.IER_THRI)
    h.read(s.IIR_FCR)
    h.write(s.RBR_THR_DLL, ord("x"))
    assert h.irq
    assert h.read(s.IIR_FCR) & 0x0F == s.IIR_THRI


def test_received_bytes_raise_rdi_until_drained(h: Harness) -> None:
    h.write(s.IER_DLM, s.IER_RDI)
    assert not h.irq
    h.uart.feed(b"hi")
    assert h.irq
    assert h.read(s.IIR_FCR) & 0x0F == s.IIR_RDI
    assert h.read(s.LSR) & s.LSR_DR
    assert bytes([h.read(s.RBR_THR_DLL), h.read(s.RBR_THR_DLL)]) == b"hi"
    assert not h.read(s.LSR) & s.LSR_DR
    assert not h.irq
    assert h.uart.pending_input() == 0


def test_rx_has_priority_over_thri(h: Harness) -> None:
    h.write(s.IER_DLM, s.IER_RDI | s.IER_THRI)
    h.uart.feed(b"a")
    assert h.read(s.IIR_FCR) & 0x0F == s.IIR_RDI


def test_fcr_clears_receive_queue(h: Harness) -> None:
    h.uart.feed(b"abc")
    h.write(s.IIR_FCR, s.FCR_ENABLE_FIFO | s.FCR_CLEAR_RCVR)
    assert not h.read(s.LSR) & s.LSR_DR


def test_loopback_sends_to_receiver_not_output(h: Harness) -> None:
    h.write(s.MCR, s.MCR_LOOP)
    h.write(s.RBR_THR_DLL, 0x55)
    assert h.output == b""
    assert h.read(s.RBR_THR_DLL) == 0x55


def test_irq_callback_only_on_level_changes(h: Harness) -> None:
    h.write(s.IER_DLM, s.IER_RDI)
    h.uart.feed(b"a")
    h.uart.feed(b"b")
    assert h.irq_changes == [True]


def test_modem_lines_report_a_connected_peer(h: Harness) -> None:
    assert h.read(s.MSR) & (s.MSR_CTS | s.MSR_DSR | s.MSR_DCD) == (
        s.MSR_CTS | s.MSR_DSR | s.MSR_DCD)


def test_scratch_register(h: Harness) -> None:
    h.write(s.SCR, 0xA5)
    assert h.read(s.SCR) == 0xA5


def test_state_round_trip_for_snapshots(h: Harness) -> None:
    """What a snapshot saves comes back whole: registers, queued input, a pending THR-empty
    interrupt. Negative control: a fresh UART differs; malformed state is refused."""
    h.write(s.LCR, 0x03)
    h.write(s.IER_DLM, s.IER_RDI | s.IER_THRI)
    h.write(s.SCR, 0x5A)
    h.uart.feed(b"ok")
    saved = h.uart.state()
    other = Harness()
    assert other.uart.state() != saved
    other.uart.load_state(saved)
    assert other.uart.state() == saved
    assert other.read(s.SCR) == 0x5A and other.read(s.RBR_THR_DLL) == ord("o")
    with pytest.raises(ValueError, match="malformed UART state"):
        other.uart.load_state({**saved, "lcr": 300})
    with pytest.raises(ValueError, match="rx must be a list"):
        other.uart.load_state({**saved, "rx": "ok"})
