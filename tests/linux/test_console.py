"""Console line assembly and waiting, the power-off device."""

from __future__ import annotations

import threading

import pytest

from vmmswap.vm.linux.console import Console, ConsoleClosedError
from vmmswap.vm.linux.power import PowerOffDevice


def test_lines_are_assembled_across_writes_and_crlf_stripped() -> None:
    echoed: list[str] = []
    console = Console(echoed.append)
    console.write(b"hel")
    console.write(b"lo\r\nwor")
    assert [line.text for line in console.lines] == ["hello"]
    console.write(b"ld\n")
    assert echoed == ["hello", "world"]
    assert console.text() == "hello\nworld\n"


def test_protocol_message_is_found_after_kernel_noise() -> None:
    console = Console()
    console.write(b"[ 1.0] random: crng init done VMMSWAP-PONG 3\n")
    line = console.wait_for_message("PONG 3", timeout=1)
    assert line.message == "PONG 3"


def test_wait_respects_start_index_and_prefix_boundaries() -> None:
    console = Console()
    console.write(b"VMMSWAP-PONG 1\nVMMSWAP-PONG 12\n")
    assert console.wait_for_message("PONG 1", timeout=1).index == 0
    assert console.wait_for_message("PONG 12", start=1, timeout=1).index == 1
    with pytest.raises(TimeoutError, match="PONG 12"):
        console.wait_for_message("PONG 1", start=1, timeout=0.05)


def test_wait_wakes_when_line_arrives_from_another_thread() -> None:
    console = Console()
    timer = threading.Timer(0.05, console.write, args=(b"VMMSWAP-READY uptime=1.0\n",))
    timer.start()
    try:
        assert console.wait_for_message("READY", timeout=5).message == "READY uptime=1.0"
    finally:
        timer.join()


def test_close_wakes_waiters_with_a_reason() -> None:
    console = Console()
    console.close("the guest powered off")
    with pytest.raises(ConsoleClosedError, match="powered off"):
        console.wait_for_message("PONG 1", timeout=5)


def test_power_off_fires_once_with_the_value() -> None:
    calls: list[int] = []
    device = PowerOffDevice(calls.append)
    assert not device.powered_off
    device.io_out(device.port, 1, 0x50)
    device.io_out(device.port, 1, 0x51)
    assert calls == [0x50] and device.value == 0x50
    assert device.wait(0) and device.io_in(device.port, 1) == 0
