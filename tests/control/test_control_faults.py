"""The monitor's fault serving (UffdSet) with fake uffds: changing address spaces, faults that
cannot be served, dead devices. No fault may be dropped or answered wrongly."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from vmmswap.control import monitor_faults
from vmmswap.control.monitor_faults import UffdEntry, UffdSet, VmmGoneError
from vmmswap.dataplane.guest_memory import RegionSpec
from vmmswap.kernel.uffd import PagefaultFlag
from vmmswap.uffd.errors import MappingChangingError, ProcessGoneError
from vmmswap.uffd.events import Event, PageFault, Remove

BASE = 0x7F0000000000
REGION = RegionSpec(0, BASE, 0x100000)


class FakeUffd:
    def __init__(self) -> None:
        self.queue: list[list[Event]] = []
        self.registered: list[tuple[int, int]] = []
        self.zeroed: list[int] = []
        self.closed = False

    def read_events(self) -> list[Event]:
        return self.queue.pop(0) if self.queue else []

    def register(self, addr: int, length: int, mode: Any = None) -> None:
        self.registered.append((addr, length))

    def unregister(self, addr: int, length: int) -> None:
        self.registered.remove((addr, length))

    def zero(self, addr: int, length: int) -> int:
        self.zeroed.append(addr)
        return length

    def wake(self, addr: int, length: int) -> None:
        pass

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        self.closed = True


class Handler:
    def __init__(self) -> None:
        self.served: list[int] = []
        self.removed: list[tuple[int, int]] = []
        self.errors: list[BaseException] = []

    def handle_page_fault(self, uffd: Any, addr: int, write: bool = False) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.served.append(addr)

    def handle_remove(self, start: int, end: int) -> None:
        self.removed.append((start, end))


def fault(n: int) -> PageFault:
    return PageFault(BASE + n * 4096, PagefaultFlag(0))


@pytest.fixture
def setup() -> tuple[UffdSet, FakeUffd, Handler, list[UffdEntry]]:
    uffd = FakeUffd()
    handler = Handler()
    dropped: list[UffdEntry] = []
    main = UffdEntry(uffd, 1, main=True)  # type: ignore[arg-type]
    uffds = UffdSet([REGION], main, lambda: handler, dropped.append)  # type: ignore[arg-type,return-value]
    return uffds, uffd, handler, dropped


def test_drains_every_batch_and_applies_removes(setup: Any) -> None:
    uffds, uffd, handler, _ = setup
    uffd.queue = [[fault(1), Remove(BASE, BASE + 8192)], [fault(2)]]
    assert uffds.serve(uffds.main) == 2
    assert handler.served == [BASE + 4096, BASE + 8192]
    assert handler.removed == [(BASE, BASE + 8192)]


def test_changing_address_space_reads_events_then_retries(setup: Any) -> None:
    uffds, uffd, handler, _ = setup
    handler.errors = [MappingChangingError(errno.EAGAIN, "changing")]
    uffd.queue = [[fault(1)]]

    def later() -> list[Event]:
        return [Remove(BASE + 0x10000, BASE + 0x11000), fault(3)]

    original = uffd.read_events
    calls = [0]

    def read_events() -> list[Event]:
        calls[0] += 1
        if calls[0] == 3:  # after the first drain ended, the REMOVE and a new fault arrive
            return later()
        return original()

    uffd.read_events = read_events
    uffds.serve(uffds.main)
    assert handler.removed == [(BASE + 0x10000, BASE + 0x11000)]
    assert sorted(handler.served) == [BASE + 4096, BASE + 3 * 4096]


def test_unservable_fault_stays_blocked_and_is_retried(setup: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    uffds, uffd, handler, _ = setup
    monkeypatch.setattr(monitor_faults, "STUCK_RETRY_INTERVAL", 0.0)
    handler.errors = [OSError(errno.EIO, "disk"), OSError(errno.EIO, "disk")]
    uffd.queue = [[fault(5)]]
    uffds.serve(uffds.main)
    assert handler.served == [] and uffd.zeroed == [] and uffds.stuck_count == 1
    assert "disk" in (uffds.last_error or "")
    uffds.retry_stuck()
    assert uffds.stuck_count == 1
    uffds.retry_stuck()
    assert handler.served == [BASE + 5 * 4096] and uffds.stuck_count == 0


def test_dead_device_is_dropped_dead_vmm_stops_the_monitor(setup: Any) -> None:
    uffds, _, handler, dropped = setup
    dev_uffd = FakeUffd()
    device = UffdEntry(dev_uffd, 2)  # type: ignore[arg-type]
    uffds.add_device(device, enabled=True)
    assert dev_uffd.registered == [(BASE, REGION.size)]
    handler.errors = [ProcessGoneError(errno.ESRCH, "gone")]
    dev_uffd.queue = [[fault(1)]]
    uffds.serve(device)
    assert dropped == [device] and dev_uffd.closed and uffds.devices == []
    handler.errors = [ProcessGoneError(errno.ESRCH, "gone")]
    uffds.main.uffd.queue = [[fault(1)]]
    with pytest.raises(VmmGoneError):
        uffds.serve(uffds.main)


def test_stray_fault_while_disabled_is_zero_filled(setup: Any) -> None:
    uffd = FakeUffd()
    main = UffdEntry(uffd, 1, main=True)  # type: ignore[arg-type]
    uffds = UffdSet([REGION], main, lambda: None, lambda e: None)
    uffd.queue = [[fault(7), Remove(BASE, BASE + 4096)]]
    uffds.serve(main)
    assert uffd.zeroed == [BASE + 7 * 4096]


def test_fault_queued_during_unregister_is_woken_not_retried_forever() -> None:
    """A fault the kernel queued while the range was being unregistered reaches a Ready monitor
    after the registration is gone: ZEROPAGE says ENOENT. The thread must be woken (it then
    faults as on plain memory, where every page is back), not kept for retries that can never
    succeed -- the torture harness's "worker stuck after disable"."""

    class Unregistered(FakeUffd):
        def __init__(self) -> None:
            super().__init__()
            self.woken: list[int] = []

        def zero(self, addr: int, length: int) -> int:
            raise OSError(errno.ENOENT, "UFFDIO_ZEROPAGE: not registered")

        def wake(self, addr: int, length: int) -> None:
            self.woken.append(addr)

    uffd = Unregistered()
    main = UffdEntry(uffd, 1, main=True)  # type: ignore[arg-type]
    uffds = UffdSet([REGION], main, lambda: None, lambda e: None)
    uffd.queue = [[fault(3)]]
    uffds.serve(main)
    assert uffd.woken == [BASE + 3 * 4096]
    assert uffds.stuck_count == 0


def test_other_errors_while_disabled_keep_the_fault_blocked() -> None:
    """Only "not registered" means the thread may run on; any other failure keeps it blocked
    and retried (a wrong wake there could let it read memory that is not back)."""

    class Failing(FakeUffd):
        def zero(self, addr: int, length: int) -> int:
            raise OSError(errno.EIO, "UFFDIO_ZEROPAGE: I/O error")

    uffd = Failing()
    main = UffdEntry(uffd, 1, main=True)  # type: ignore[arg-type]
    uffds = UffdSet([REGION], main, lambda: None, lambda e: None)
    uffd.queue = [[fault(3)]]
    uffds.serve(main)
    assert uffds.stuck_count == 1


def test_failed_registration_is_rolled_back(setup: Any) -> None:
    uffds, _, _, _ = setup
    bad = FakeUffd()
    regions = [REGION, RegionSpec(0x200000, BASE + 0x200000, 0x100000)]
    uffds = UffdSet(regions, UffdEntry(bad, 1, main=True),  # type: ignore[arg-type]
                    lambda: None, lambda e: None)
    original = bad.register

    def register(addr: int, length: int, mode: Any = None) -> None:
        if addr != BASE:
            raise OSError(errno.EINVAL, "not mapped")
        original(addr, length)

    bad.register = register  # type: ignore[method-assign]
    with pytest.raises(OSError, match="not mapped"):
        uffds.register_all()
    assert bad.registered == [] and not uffds.main.registered


def test_faults_read_before_an_unexpected_error_are_kept(setup: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in the middle of a batch (here: reading events after a changing address
    space) must not forget the faults already read: the kernel never sends them again."""
    uffds, uffd, handler, _ = setup
    monkeypatch.setattr(monitor_faults, "STUCK_RETRY_INTERVAL", 0.0)
    handler.errors = [MappingChangingError(errno.EAGAIN, "changing")]
    uffd.queue = [[fault(1), fault(2), fault(3)]]
    reads = [0]
    original = uffd.read_events

    def read_events() -> list[Event]:
        reads[0] += 1
        if reads[0] == 3:  # the drain after the changing error
            raise OSError(errno.ENOMEM, "injected")
        return original()

    uffd.read_events = read_events
    with pytest.raises(OSError, match="injected"):
        uffds.serve(uffds.main)
    assert uffds.stuck_count == 3  # faults 1 (unserved), 2 and 3
    uffd.read_events = original
    uffds.retry_stuck()
    assert sorted(handler.served) == [BASE + 4096, BASE + 2 * 4096, BASE + 3 * 4096]
    assert uffds.stuck_count == 0


def test_retry_keeps_what_it_did_not_reach(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    uffds, uffd, handler, _ = setup
    monkeypatch.setattr(monitor_faults, "STUCK_RETRY_INTERVAL", 0.0)
    handler.errors = [OSError(errno.EIO, "disk")] * 3
    uffd.queue = [[fault(1), fault(2), fault(3)]]
    uffds.serve(uffds.main)
    assert uffds.stuck_count == 3
    handler.errors = [MappingChangingError(errno.EAGAIN, "changing")]
    original = uffd.read_events

    def broken() -> list[Event]:
        raise OSError(errno.ENOMEM, "injected")

    uffd.read_events = broken
    with pytest.raises(OSError, match="injected"):
        uffds.retry_stuck()
    assert uffds.stuck_count == 3
    uffd.read_events = original
    uffds.retry_stuck()
    assert sorted(handler.served) == [BASE + 4096, BASE + 2 * 4096, BASE + 3 * 4096]
