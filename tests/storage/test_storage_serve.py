"""Lazy restore from the object store, end to end through the command line.

``vmmswap store put`` uploads a memory file to SeaweedFS; ``vmmswap serve-snapshot --mem-url``
serves it to a VMM doing Firecracker's handshake (tests/snapshot/fake_firecracker.py, a child
process that faults only inside the kernel's copy), fetching verified chunks on demand through
an on-disk cache. A second restore with the warm cache fetches nothing. A chunk corrupted in
the store leaves the VMM's faults waiting -- the status file shows the hash failures -- until
the chunk is repaired, and then the right bytes arrive: never the corrupted ones, never zeros.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from seaweed import BUCKET, SeaweedServer

from vmmswap.storage.manifest import load_manifest
from vmmswap.storage.store import open_store

pytest.importorskip("obstore", reason="obstore is not installed (the s3 / dev extra)")

FAKE_VMM = Path(__file__).parents[1] / "snapshot" / "fake_firecracker.py"
SIZE = 1 << 20  # per region, two regions
TIMEOUT = 60


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmmswap.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def _cli(*args: str) -> dict[str, object]:
    out = _run(*args)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.splitlines()[-1]))


def _memory(path: Path, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, 2 * SIZE, dtype=np.uint8).tobytes())
    data[SIZE - 256 * 1024:SIZE] = bytes(256 * 1024)   # one all-zero chunk: never stored
    path.write_bytes(data)
    return bytes(data)


def _serve(tmp: Path, url: str, cache: Path, status: Path) -> tuple[subprocess.Popen[str], Path]:
    sock = tmp / "uffd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmswap.cli", "serve-snapshot", "--socket", str(sock),
         "--mem-url", url, "--cache-dir", str(cache), "--cache-mib", "16",
         "--status-file", str(status)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    assert json.loads(line) == {"listening": str(sock)}
    return proc, sock


def _vmm(sock: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(FAKE_VMM), str(sock), "new", str(out),
                             str(SIZE), "2"])


def _finish(proc: subprocess.Popen[str]) -> dict[str, int]:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return dict(json.loads(out.splitlines()[-1]))


def test_put_then_lazy_restore_twice(s3_env: dict[str, str], tmp_path: Path) -> None:
    data = _memory(tmp_path / "mem", 21)
    url = f"s3://{BUCKET}/serve/vm1/snap"
    put = _cli("store", "put", str(tmp_path / "mem"), url, "--regions", "1M,1M",
               "--chunk-kib", "256")
    assert put["chunks"] == 8 and put["zero_chunks"] == 1 and put["sent"] == 7
    info = _cli("store", "info", url)
    assert info["regions"] == [[0, SIZE], [SIZE, SIZE]] and info["zero_chunks"] == 1
    again = _cli("store", "put", str(tmp_path / "mem"), url, "--regions", "1M,1M",
                 "--chunk-kib", "256")
    assert again["sent"] == 0 and again["present"] == 7     # nothing changed: nothing sent

    cache = tmp_path / "cache"
    for attempt in ("cold", "warm"):
        status = tmp_path / f"status-{attempt}.json"
        proc, sock = _serve(tmp_path, url, cache, status)
        vmm = _vmm(sock, tmp_path / f"seen-{attempt}")
        assert vmm.wait(TIMEOUT) == 0
        stats = _finish(proc)
        assert (tmp_path / f"seen-{attempt}").read_bytes() == data
        if attempt == "cold":
            assert stats["source_chunks_fetched"] == 7 and stats["source_hash_failures"] == 0
        else:
            assert stats["source_chunks_fetched"] == 0 and stats["source_cache_hits"] > 0
        assert json.loads(status.read_text())["state"] == "done"


def test_get_writes_the_snapshot_back(s3_env: dict[str, str], tmp_path: Path) -> None:
    data = _memory(tmp_path / "mem", 22)
    url = f"s3://{BUCKET}/serve/vm2/snap"
    _cli("store", "put", str(tmp_path / "mem"), url)
    got = _cli("store", "get", url, str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == data and got["hash_failures"] == 0
    refused = _run("store", "get", url, str(tmp_path / "back"))
    assert refused.returncode == 1 and "exists" in refused.stderr


def test_bad_input_is_refused_and_uploads_nothing(s3_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    _memory(tmp_path / "mem", 23)
    url = f"s3://{BUCKET}/serve/bad/snap"
    for args, why in ((["--regions", "1M"], "add up to"), (["--chunk-kib", "6"], "multiple"),
                      (["--regions", "1M,x"], "not a positive")):
        out = _run("store", "put", str(tmp_path / "mem"), url, *args)
        assert out.returncode == 1 and why in out.stderr, out.stderr
    missing = _run("store", "info", url)
    assert missing.returncode == 1 and "no snapshot here" in missing.stderr
    store, _ = open_store(url)
    assert list(store.list("serve/bad/")) == []


def test_corrupted_chunk_blocks_the_vmm_until_repaired(seaweed: SeaweedServer,
                                                       s3_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    data = _memory(tmp_path / "mem", 24)
    url = f"s3://{BUCKET}/serve/vm3/snap"
    _cli("store", "put", str(tmp_path / "mem"), url, "--regions", "1M,1M", "--chunk-kib", "256")
    store, prefix = open_store(url)
    manifest = load_manifest(store, prefix)
    key = manifest.chunk_key(manifest.regions[0].chunks[0] or "")
    good = store.get(key)
    store.put(key, bytes([good[0] ^ 0x80]) + good[1:])      # one bit of the first chunk
    status = tmp_path / "status.json"
    proc, sock = _serve(tmp_path, url, tmp_path / "cache", status)
    vmm = _vmm(sock, tmp_path / "seen")
    try:
        deadline = time.monotonic() + 30
        failures = 0
        while time.monotonic() < deadline:
            if status.exists():
                doc = json.loads(status.read_text())
                failures = int(doc.get("source", {}).get("hash_failures", 0))
                if failures >= 2:
                    break
            time.sleep(0.1)
        assert failures >= 2, "the corrupted chunk was not refused"
        assert vmm.poll() is None, "the VMM finished reading with a chunk that cannot verify"
        assert doc["state"] == "serving" and doc["source"]["waiting"] >= 1
        assert doc["source"]["last_error"]
        store.put(key, good)
        assert vmm.wait(TIMEOUT) == 0
    finally:
        if vmm.poll() is None:
            vmm.kill()
    stats = _finish(proc)
    seen = (tmp_path / "seen").read_bytes()
    assert seen == data   # negative control of the check: the store held a flipped bit
    assert stats["source_hash_failures"] >= 2
    assert os.stat(status).st_mode & 0o777 == 0o600


def test_failed_get_leaves_no_file(tmp_path: Path) -> None:
    """A get that cannot finish (a chunk gone from the store) leaves nothing at MEM_FILE that
    could later be served as the snapshot: no file of holes, no partial file."""
    _memory(tmp_path / "mem", 25)
    url = str(tmp_path / "store" / "vm" / "snap")       # a directory store
    _cli("store", "put", str(tmp_path / "mem"), url, "--chunk-kib", "256")
    chunk = next(p for p in (tmp_path / "store" / "vm" / "snap" / "chunks").iterdir())
    chunk.unlink()
    out = _run("store", "get", url, str(tmp_path / "back"), "--give-up-after", "0.5")
    assert out.returncode == 1, out.stdout
    assert not (tmp_path / "back").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("back")] == []


def test_readahead_fetches_no_chunk_past_a_run_and_records_the_run(tmp_path: Path) -> None:
    """A guest touching a run that ends at a chunk boundary makes the handler fetch the run's
    chunks and no more, and the recorded working set is the run -- the readahead of the
    run's last fault used to reach into the next chunk: one whole chunk fetched, and
    recorded, per run (bench_store's bytes fetched 1.28x the working set)."""
    data = _memory(tmp_path / "mem", 24)
    url = str(tmp_path / "store" / "snap")    # the local-directory store: the same ChunkSource
    _cli("store", "put", str(tmp_path / "mem"), url, "--regions", "1M,1M", "--chunk-kib", "256")
    runs = [[0, 512 * 1024], [SIZE + 256 * 1024, 256 * 1024]]    # 3 chunks of 256 KiB
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    sock, status = tmp_path / "uffd.sock", tmp_path / "status.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmswap.cli", "serve-snapshot", "--socket", str(sock),
         "--mem-url", url, "--cache-dir", str(tmp_path / "cache"), "--status-file",
         str(status), "--record-working-set", str(tmp_path / "ws.npy")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline()
    vmm = subprocess.Popen([sys.executable, str(FAKE_VMM), str(sock), f"runs:{tmp_path}/runs.json",
                            str(tmp_path / "sum"), str(SIZE), "2"], stdout=subprocess.PIPE)
    assert vmm.wait(TIMEOUT) == 0
    stats = _finish(proc)
    words = np.frombuffer(data, dtype=np.uint64)
    want = int(words[0]) + sum(int(words[o // 8:(o + n) // 8:512].sum(dtype=np.uint64))
                               for o, n in runs)   # the first touch reads one word twice
    assert int((tmp_path / "sum").read_text()) == want % (1 << 64)
    assert stats["source_chunks_fetched"] == 3, stats
    recorded = np.load(tmp_path / "ws.npy")
    expect = np.concatenate([np.arange(o // 4096, (o + n) // 4096) for o, n in runs])
    assert np.array_equal(recorded, expect.astype(np.uint64)), (recorded.min(), recorded.max(),
                                                               len(recorded))
