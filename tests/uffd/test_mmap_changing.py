"""Selftest ``mmap-changing``: while a REMOVE event is unread, every fill ioctl says EAGAIN with
-EAGAIN in its result field -- which the wrapper reports as MappingChangingError, not as a
partial fill (the Rust crate's bug).
"""

from __future__ import annotations

import errno
import select
import threading
import time
from collections.abc import Callable

import pytest
from uffd_helpers import make_area, require, run_in_child

from vmmswap.kernel import libc
from vmmswap.kernel.uffd import Feature, RegisterMode
from vmmswap.uffd.errors import MappingChangingError, PartialFillError
from vmmswap.uffd.events import Remove
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.pagesize import PAGE_SIZE
from vmmswap.uffd.userfaultfd import Userfaultfd

FEATURES = (Feature.EVENT_REMOVE | Feature.MOVE | Feature.POISON | Feature.MINOR_SHMEM
            | Feature.MISSING_SHMEM | Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM)


def scenario() -> dict[str, object]:
    area = make_area("shmem", 4)
    src = Mapping.anonymous(PAGE_SIZE, populate=True)
    uffd = Userfaultfd.new(FEATURES)
    uffd.register(area.address, area.length,
                  RegisterMode.MISSING | RegisterMode.MINOR | RegisterMode.WP)
    # This thread hangs in madvise until the REMOVE event is read (GIL released: ctypes).
    remover = threading.Thread(
        target=libc.madvise, args=(area.address, PAGE_SIZE, libc.MADV_REMOVE), daemon=True)
    remover.start()
    ready, _, _ = select.select([uffd], [], [], 10)
    assert ready, "no REMOVE event"
    results: dict[str, object] = {}
    target = area.page(1)
    calls: dict[str, Callable[[], object]] = {
        "copy": lambda: uffd.copy(target, PAGE_SIZE, src.address),
        "zero": lambda: uffd.zero(target, PAGE_SIZE),
        "move": lambda: uffd.move(target, src.address, PAGE_SIZE),
        "poison": lambda: uffd.poison(target, PAGE_SIZE),
        "continue": lambda: uffd.continue_(target, PAGE_SIZE),
        "write_protect": lambda: uffd.write_protect(target, PAGE_SIZE),
    }
    for name, call in calls.items():
        try:
            call()
            results[name] = "succeeded"
        except MappingChangingError as err:
            results[name] = (err.errno, err.result, err.bytes_done,
                             isinstance(err, BlockingIOError), isinstance(err, PartialFillError))
        except OSError as err:
            results[name] = f"{type(err).__name__}: {err}"
    results["event"] = uffd.read_events()
    remover.join(10)
    results["remover_done"] = not remover.is_alive()
    # After the event is read the fill works again (the flag clears once the remover resumes).
    deadline = time.monotonic() + 5
    while True:
        try:
            results["retry"] = uffd.copy(target, PAGE_SIZE, src.address)
            break
        except MappingChangingError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)
    return results


@pytest.mark.timeout(60)
def test_mmap_changing() -> None:
    require(Feature.EVENT_REMOVE | Feature.MOVE | Feature.POISON | Feature.MINOR_SHMEM)
    results = run_in_child(scenario)
    changing = (errno.EAGAIN, -errno.EAGAIN, 0, True, False)
    for name in ("copy", "zero", "move", "poison", "continue"):
        assert results[name] == changing, f"{name}: {results[name]}"
    # WRITEPROTECT has no result field; its EAGAIN is the same condition.
    assert results["write_protect"] == (errno.EAGAIN, 0, 0, True, False)
    events = results["event"]
    assert isinstance(events, list) and len(events) == 1 and isinstance(events[0], Remove)
    assert results["remover_done"]
    assert results["retry"] == PAGE_SIZE
