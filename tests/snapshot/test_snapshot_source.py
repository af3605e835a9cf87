"""FileSource: whole reads or an error, never a short view passed on as data."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmmswap.snapshot.source import FileSource, MemorySource, SourceError


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
