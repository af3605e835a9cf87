"""FileSource: whole reads or an error, never a short view passed on as data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vmmswap.snapshot.source import FileSource, MemorySource, OverlaySource, SourceError


def test_file_source_reads_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    path.write_bytes(bytes(range(256)) * 64)
    source = FileSource.open(path)
    try:
        assert isinstance(source, MemorySource)
        assert source.size == 256 * 64
        view = memoryview(bytearray(300))
        source.read_into(100, view)
        assert bytes(view) == (bytes(range(256)) * 64)[100:400]
    finally:
        source.close()


def test_file_source_past_the_end_raises_instead_of_returning_short(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    path.write_bytes(b"\xaa" * 4096)
    source = FileSource.open(path)
    try:
        view = memoryview(bytearray(b"\x55" * 8192))
        with pytest.raises(SourceError, match="short read"):
            source.read_into(0, view)
    finally:
        source.close()


def _overlay(tmp_path: Path, marked: list[int]) -> tuple[OverlaySource, bytes, bytes]:
    base = bytes([1]) * 4096 * 8
    diff = bytearray(4096 * 8)
    for page in marked:
        diff[page * 4096:(page + 1) * 4096] = bytes([page + 10]) * 4096
    diff[6 * 4096:7 * 4096] = bytes(4096)  # a listed page that is zeros in the diff
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "diff").write_bytes(bytes(diff))
    pages = np.zeros(8, dtype=np.bool_)
    pages[marked] = True
    source = OverlaySource(FileSource.open(tmp_path / "base"),
                           FileSource.open(tmp_path / "diff"), pages)
    return source, base, bytes(diff)


def test_overlay_serves_listed_pages_from_the_diff(tmp_path: Path) -> None:
    source, base, diff = _overlay(tmp_path, [2, 3, 6])
    try:
        view = memoryview(bytearray(8 * 4096))
        source.read_into(0, view)
        for page in range(8):
            want = (diff if page in (2, 3, 6) else base)[page * 4096:(page + 1) * 4096]
            assert bytes(view[page * 4096:(page + 1) * 4096]) == want, page
        assert bytes(view[6 * 4096:7 * 4096]) == bytes(4096)  # zeros, not the base's ones
        part = memoryview(bytearray(2 * 4096))
        source.read_into(3 * 4096, part)
        assert bytes(part) == diff[3 * 4096:4 * 4096] + base[4 * 4096:5 * 4096]
    finally:
        source.close()


def test_overlay_negative_control_unlisted_pages_come_from_the_base(tmp_path: Path) -> None:
    source, base, _diff = _overlay(tmp_path, [])
    try:
        view = memoryview(bytearray(8 * 4096))
        source.read_into(0, view)
        assert bytes(view) == base
    finally:
        source.close()


def test_overlay_refuses_mismatched_layers(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(bytes(8192))
    (tmp_path / "b").write_bytes(bytes(4096))
    a, b = FileSource.open(tmp_path / "a"), FileSource.open(tmp_path / "b")
    try:
        with pytest.raises(SourceError, match="full-size"):
            OverlaySource(a, b, np.zeros(2, dtype=np.bool_))
        with pytest.raises(SourceError, match="page map"):
            OverlaySource(a, a, np.zeros(3, dtype=np.bool_))
    finally:
        a.close()
        b.close()
