"""SwapFile: nameless O_TMPFILE, packed slots, atomic writes, page state size."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from vmmswap.dataplane.swap_file import SwapFile
from vmmswap.uffd.pagesize import PAGE_SIZE


def pages_data(*tags: int) -> memoryview:
    return memoryview(b"".join(bytes([t]) * PAGE_SIZE for t in tags))


def read_page(f: SwapFile, page: int) -> bytes:
    buf = bytearray(PAGE_SIZE)
    f.read_pages(page, page + 1, memoryview(buf))
    return bytes(buf)


def test_file_is_nameless_private_and_cloexec(tmp_path: Path) -> None:
    with SwapFile.create(tmp_path, 16) as f:
        assert list(tmp_path.iterdir()) == []  # no name in the directory
        st = os.fstat(f.fileno())
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_nlink == 0
        assert not os.get_inheritable(f.fileno())
        assert "(deleted)" in os.readlink(f"/proc/self/fd/{f.fileno()}")


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot create the swap file"):
        SwapFile.create(tmp_path / "nope", 16)


def test_write_then_read_and_reuse_slots(tmp_path: Path) -> None:
    with SwapFile.create(tmp_path, 100) as f:
        f.write_pages(np.array([10, 11, 12, 50]), pages_data(1, 2, 3, 4))
        assert f.current_pages == 4 and f.used_slots == 4 and f.file_pages == 4
        assert [f.slot(p) for p in (10, 11, 12, 50)] == [0, 1, 2, 3]
        assert read_page(f, 12) == bytes([3]) * PAGE_SIZE
        assert f.slot_runs(10, 13) == [(10, 0, 3)]
        # Paged back in: the copy goes stale but keeps its slot (for trim).
        f.clear_current(11, 12)
        assert not f.is_current(11) and f.slot(11) == 1 and f.used_slots == 4
        # Written again: same slot, rewritten in place.
        f.write_pages(np.array([11]), pages_data(9))
        assert f.slot(11) == 1 and read_page(f, 11) == bytes([9]) * PAGE_SIZE
        # Freed slots are reused lowest first: the file stays packed.
        assert f.free_range(10, 12) == 2
        assert f.used_slots == 2
        f.write_pages(np.array([70, 71, 72]), pages_data(5, 6, 7))
        assert [f.slot(p) for p in (70, 71, 72)] == [0, 1, 4]
        assert f.file_pages == 5
        assert read_page(f, 72) == bytes([7]) * PAGE_SIZE
        assert read_page(f, 50) == bytes([4]) * PAGE_SIZE


def test_failed_write_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with SwapFile.create(tmp_path, 10) as f:
        f.write_pages(np.array([0]), pages_data(1))

        def full(*_args: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(OSError) as info:
            f.write_pages(np.array([1, 2]), pages_data(2, 3))
        assert info.value.errno == errno.ENOSPC
        assert f.current_pages == 1 and f.used_slots == 1 and f.slot(1) == -1
        monkeypatch.undo()
        f.write_pages(np.array([1, 2]), pages_data(2, 3))
        assert [f.slot(p) for p in (1, 2)] == [1, 2]


def test_free_pages_and_mark_current(tmp_path: Path) -> None:
    with SwapFile.create(tmp_path, 10) as f:
        f.write_pages(np.array([0, 1, 2]), pages_data(1, 2, 3))
        f.clear_current(0, 3)
        f.mark_current(np.array([1]))
        assert f.current_pages == 1 and f.is_current(1)
        assert f.free_pages(np.array([0, 2, 5])) == 2
        assert f.used_slots == 1
        with pytest.raises(ValueError, match="no slot"):
            f.mark_current(np.array([0]))


def test_given_descriptor_is_truncated_and_sized_later(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"old content")
    f = SwapFile(fd, None, owns_fd=False)
    # Not yet: a successor's SwapFile over the same descriptor must keep the pages.
    assert os.fstat(fd).st_size == 11
    f.ensure_pages(8)
    assert os.fstat(fd).st_size == 0
    with pytest.raises(ValueError, match="describes 8 pages"):
        f.ensure_pages(9)
    f.close()
    os.fstat(fd)  # still open: not owned
    os.close(fd)


def test_page_state_is_small(tmp_path: Path) -> None:
    pages = 262_144  # 1 GiB of guest memory
    with SwapFile.create(tmp_path, pages) as f:
        assert f.nbytes <= 1.1 * 1024 * 1024


def test_gathered_write_survives_short_writes(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A write from several buffers (swap-out from the staging mapping) lands whole and in
    order even when the kernel writes less than asked each time."""
    tags = {10: 1, 11: 2, 12: 3, 40: 4, 41: 5}
    views = {p: pages_data(t) for p, t in tags.items()}
    pages = np.array(sorted(tags), dtype=np.int64)
    real = os.pwritev
    calls = []

    def short(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls.append(len(bufs))
        return real(fd, [memoryview(b"".join(bytes(b) for b in bufs))[:5000]], offset)

    def gather(first: int, count: int) -> list[memoryview]:
        return [views[int(p)] for p in pages[first:first + count]]

    with SwapFile.create(tmp_path, 100) as f:
        monkeypatch.setattr(os, "pwritev", short)
        f.write_planned(pages, f.plan_slots(pages), gather)
        monkeypatch.undo()
        assert calls[0] == 5 and len(calls) == 5  # one gathered write, cut short 4 times
        for p, t in tags.items():
            assert read_page(f, p) == bytes([t]) * PAGE_SIZE
        # Control: the same check sees a page written wrong.
        f.write_planned(pages[:1], f.plan_slots(pages[:1]), pages_data(9))
        assert read_page(f, 10) != bytes([1]) * PAGE_SIZE
