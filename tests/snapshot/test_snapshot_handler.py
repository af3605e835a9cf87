"""Conformance of ``vmmswap serve-snapshot`` with Firecracker's page-fault handler handshake.

Written from Firecracker's docs (docs/snapshotting/handling-page-faults-on-snapshot-resume.md):
the VMM creates the uffd, registers guest memory, connects and sends a JSON array of
GuestRegionUffdMapping objects with the uffd by SCM_RIGHTS; the memory file is the regions one
after another; removed (ballooned) ranges read as zeros; the handler ends when the VMM closes
the socket. The fake VMM (fake_firecracker.py) runs in a child process and faults only inside
the kernel's copy; every process runs under a hard timeout.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vmmswap.snapshot.handshake import (
    HandshakeError,
    RegionMapping,
    encode_mappings,
    parse_mappings,
)
from vmmswap.snapshot.server import SnapshotServer
from vmmswap.snapshot.source import FileSource
from vmmswap.snapshot.working_set import load_working_set

HERE = Path(__file__).parent
SIZE = 1 << 20  # per region
TIMEOUT = 30


def _mem_file(tmp: Path, regions: int = 2) -> tuple[Path, bytes]:
    rng = np.random.default_rng(14)
    data = rng.integers(0, 256, regions * SIZE, dtype=np.uint8).tobytes()
    path = tmp / "mem"
    path.write_bytes(data)
    return path, data


def _handler(tmp: Path, mem: Path, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    sock = tmp / "uffd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmswap.cli", "serve-snapshot", "--socket", str(sock),
         "--mem-file", str(mem), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert json.loads(line) == {"listening": str(sock)}, proc.stderr.read() if proc.stderr else ""
    return proc, sock


def _vmm(sock: Path, mode: str, out: Path, regions: int = 2) -> None:
    subprocess.run([sys.executable, str(HERE / "fake_firecracker.py"), str(sock), mode,
                    str(out), str(SIZE), str(regions)], check=True, timeout=TIMEOUT)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, int], str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    return proc.returncode, (lines[-1] if lines else {}), err


@pytest.mark.parametrize("mode", ["new", "kib"])
def test_both_field_spellings_serve_the_memory_file(tmp_path: Path, mode: str) -> None:
    mem, data = _mem_file(tmp_path)
    proc, sock = _handler(tmp_path, mem)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    _vmm(sock, mode, tmp_path / "seen")
    rc, stats, err = _finish(proc)  # the VMM closed the socket: the handler exits
    assert rc == 0, err
    assert (tmp_path / "seen").read_bytes() == data
    assert 0 < stats["faults"] < 2 * SIZE // 4096  # readahead served runs, not single pages
    assert not sock.exists()


def test_negative_control_a_different_file_is_seen(tmp_path: Path) -> None:
    """The comparison above can fail: serve another file and the bytes differ."""
    _mem, data = _mem_file(tmp_path)
    other = tmp_path / "other"
    other.write_bytes(bytes(len(data)))
    proc, sock = _handler(tmp_path, other)
    _vmm(sock, "new", tmp_path / "seen")
    assert _finish(proc)[0] == 0
    assert (tmp_path / "seen").read_bytes() != data


def test_balloon_remove_reads_zeros(tmp_path: Path) -> None:
    mem, data = _mem_file(tmp_path)
    proc, sock = _handler(tmp_path, mem)
    _vmm(sock, "remove", tmp_path / "seen")
    rc, stats, err = _finish(proc)
    assert rc == 0, err
    seen = (tmp_path / "seen").read_bytes()
    assert seen[:2 * SIZE] == data
    again = seen[2 * SIZE:]
    assert again[:SIZE // 2] == data[:SIZE // 2]  # kept pages keep their data
    assert again[SIZE // 2:] == bytes(SIZE // 2)  # removed pages read as zeros, not file data
    assert data[SIZE // 2:SIZE] != bytes(SIZE // 2)  # negative control: the file has data there
    assert stats["removes"] >= 1 and stats["zero_pages"] == SIZE // 2 // 4096


@pytest.mark.parametrize("message, why", [
    ("not json", "not JSON"),
    ("{}", "non-empty JSON array"),
    ('[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0}]', "neither page_size"),
    ('[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 512}]',
     "page size 512"),
    ('[{"base_host_virt_addr": 4097, "size": 4096, "offset": 0, "page_size": 4096}]',
     "multiples of the page size"),
    ('[{"base_host_virt_addr": 4096, "size": 8192, "offset": 4194304, "page_size": 4096}]',
     "past the memory file"),
    ('[{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size": 4096},'
     ' {"base_host_virt_addr": 8192, "size": 4096, "offset": 0, "page_size": 4096}]', "overlap"),
    ('[{"base_host_virt_addr": -4096, "size": 4096, "offset": 0, "page_size": 4096}]',
     "non-negative integer"),
])
def test_malformed_handshake_is_refused_clearly(tmp_path: Path, message: str, why: str) -> None:
    mem, _data = _mem_file(tmp_path)
    proc, sock = _handler(tmp_path, mem)
    _vmm(sock, "raw:" + message, tmp_path / "reply")
    reply = json.loads((tmp_path / "reply").read_bytes())
    assert why in reply["error"]
    # Refused, nothing served, still listening: a good VMM is then served.
    _vmm(sock, "new", tmp_path / "seen")
    rc, _stats, err = _finish(proc)
    assert rc == 0 and why in err


def test_parse_mappings_in_process() -> None:
    ok = parse_mappings(b'[{"base_host_virt_addr": 2097152, "size": 4194304, "offset": 0,'
                        b' "page_size_kib": 2097152}]')
    assert ok[0].page_size == 2 << 20
    with pytest.raises(HandshakeError, match="page_size must be a non-negative integer"):
        parse_mappings(b'[{"base_host_virt_addr": 0, "size": 4096, "offset": 0,'
                       b' "page_size": 4096.0}]')


def test_vmm_exit_ends_the_handler(tmp_path: Path) -> None:
    mem, _data = _mem_file(tmp_path)
    proc, sock = _handler(tmp_path, mem)
    start = time.monotonic()
    _vmm(sock, "exit", tmp_path / "reply")
    rc, stats, err = _finish(proc)
    assert rc == 0, err
    assert stats["faults"] == 0
    assert time.monotonic() - start < TIMEOUT


def test_working_set_record_then_prefetch(tmp_path: Path) -> None:
    mem, data = _mem_file(tmp_path)
    ws = tmp_path / "ws.npy"
    proc, sock = _handler(tmp_path, mem, "--record-working-set", str(ws))
    _vmm(sock, "new", tmp_path / "seen")
    rc, first, err = _finish(proc)
    assert rc == 0, err
    pages = load_working_set(str(ws))
    assert len(pages) == 2 * SIZE // 4096
    proc, sock = _handler(tmp_path, mem, "--working-set", str(ws))
    _vmm(sock, "new", tmp_path / "seen2")
    rc, second, err = _finish(proc)
    assert rc == 0, err
    assert (tmp_path / "seen2").read_bytes() == data
    assert second["pages_prefetched"] > 0
    assert second["faults"] <= first["faults"]


def test_encoder_writes_what_a_current_firecracker_sends() -> None:
    """Firecracker >= 1.12 serialises GuestRegionUffdMapping with serde_json: compact, in field
    order, with the deprecated page_size_kib (bytes) next to page_size."""
    regions = [RegionMapping(0x7F00_0000_0000, 1 << 30, 0, 4096),
               RegionMapping(0x7F10_0000_0000, 2 << 20, 1 << 30, 4096)]
    assert encode_mappings(regions) == (
        b'[{"base_host_virt_addr":139637976727552,"size":1073741824,"offset":0,'
        b'"page_size":4096,"page_size_kib":4096},'
        b'{"base_host_virt_addr":139706696204288,"size":2097152,"offset":1073741824,'
        b'"page_size":4096,"page_size_kib":4096}]')
    assert parse_mappings(encode_mappings(regions)) == regions
    with pytest.raises(HandshakeError, match="disagree"):
        parse_mappings(b'[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,'
                       b'"page_size_kib":2097152}]')


def test_prefetch_runs_from_unsorted_and_repeated_pages() -> None:
    """The working set's runs need sorted unique pages; a file saved by us is, so the server
    only checks (np.unique cost the first fault tens of ms), and anything else is sorted."""
    maps = [RegionMapping(0x10000000, SIZE, 0, 4096), RegionMapping(0x40000000, SIZE, SIZE, 4096)]
    read, write = os.pipe()   # a source the constructor never reads
    os.close(write)
    source = FileSource(read, owned=True)

    class NoUffd:
        def fileno(self) -> int:
            return -1

    try:
        for pages in ([5, 3, 4, 4, 300, 257, 256], [3, 4, 5, 256, 257, 300]):
            server = SnapshotServer(NoUffd(), maps, source,  # type: ignore[arg-type]
                                    prefetch=np.array(pages, dtype=np.uint64))
            got = [(r.mapping.offset, first, count) for r, first, count in server._prefetch]
            assert got == [(0, 3, 3), (SIZE, 0, 2), (SIZE, 44, 1)], got
            server.close()
    finally:
        source.close()
