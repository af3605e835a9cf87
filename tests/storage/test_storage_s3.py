"""The store tier against a real S3 API: SeaweedFS on loopback (the session fixture).

Configuration resolution, the backend's operations and errors, a chunked upload read back
through a ChunkSource with every chunk verified, and the failures: the store stopped in the
middle of a restore (reads block and retry, then return the real bytes), a chunk corrupted in
the store (counted, retried, never served), an upload interrupted and resumed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from seaweed import BUCKET, SeaweedServer
from store_faults import FaultyStore, after_puts

from vmmswap.snapshot.source import FileSource
from vmmswap.storage.cache import ChunkCache
from vmmswap.storage.chunk_source import ChunkSource
from vmmswap.storage.manifest import MANIFEST, ManifestError, load_manifest
from vmmswap.storage.store import (
    ObjectMissing,
    ObjectStore,
    StoreUnavailable,
    join,
    open_store,
)
from vmmswap.storage.upload import upload_memory

pytest.importorskip("obstore", reason="obstore is not installed (the s3 / dev extra)")
from vmmswap.storage.s3 import S3ObjectStore, resolve_s3_config, split_s3_url

CHUNK = 256 * 1024
PAGE = 4096


def test_config_from_environment_and_profile(tmp_path: Path) -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_DEFAULT_REGION": "eu-west-3",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"}
    assert resolve_s3_config(env, tmp_path) == {
        "endpoint": "http://127.0.0.1:1", "region": "eu-west-3", "access_key_id": "k",
        "secret_access_key": "s", "token": "t"}
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = dk\naws_secret_access_key = ds\n"
        "[lab]\naws_access_key_id = lk\naws_secret_access_key = ls\n")
    (tmp_path / ".aws" / "config").write_text(
        "[profile lab]\nregion = ap-south-1\nendpoint_url = http://store:8333\n")
    assert resolve_s3_config({"AWS_PROFILE": "lab"}, tmp_path) == {
        "endpoint": "http://store:8333", "region": "ap-south-1", "access_key_id": "lk",
        "secret_access_key": "ls"}
    assert resolve_s3_config({}, tmp_path) == {"region": "us-east-1", "access_key_id": "dk",
                                               "secret_access_key": "ds"}
    assert split_s3_url("s3://b/x/y/") == ("b", "x/y")
    with pytest.raises(ValueError, match="no bucket"):
        split_s3_url("s3:///x")


def test_backend_operations_and_errors(seaweed: SeaweedServer, s3_env: dict[str, str]) -> None:
    store, prefix = open_store(f"s3://{BUCKET}/ops/t1")
    assert isinstance(store, S3ObjectStore) and prefix == "ops/t1"
    data = bytes(range(256)) * 64
    store.put("ops/t1/a", data)
    store.put("ops/t1/b", memoryview(data)[:100])
    assert store.get("ops/t1/a") == data
    assert store.get_range("ops/t1/a", 1000, 300) == data[1000:1300]
    assert store.head("ops/t1/a") == len(data) and store.head("ops/t1/none") is None
    assert sorted(store.list("ops/t1/")) == [("ops/t1/a", len(data)), ("ops/t1/b", 100)]
    with pytest.raises(ObjectMissing):
        store.get("ops/t1/none")
    store.delete("ops/t1/b")
    store.delete("ops/t1/b")
    assert store.head("ops/t1/b") is None
    wrong = S3ObjectStore(BUCKET, endpoint=seaweed.endpoint, access_key_id="nobody",
                          secret_access_key="wrong")
    with pytest.raises(StoreUnavailable, match=r"(?i)denied|forbidden|403"):
        wrong.get("ops/t1/a")


def memory_file(path: Path, pages: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, pages * PAGE, dtype=np.uint8).tobytes())
    data[CHUNK:2 * CHUNK] = bytes(CHUNK)   # one zero chunk
    path.write_bytes(data)
    return bytes(data)


def upload(store: ObjectStore, prefix: str, path: Path,  # type: ignore[no-untyped-def]
           **kw: Any):
    src = FileSource.open(path)
    try:
        return upload_memory(store, prefix, src, chunk_size=CHUNK, workers=4, **kw)
    finally:
        src.close()


def test_chunked_round_trip_verified(seaweed: SeaweedServer, s3_env: dict[str, str],
                                     tmp_path: Path) -> None:
    data = memory_file(tmp_path / "mem", 1024, seed=11)     # 4 MiB, 16 chunks
    store, prefix = open_store(f"s3://{BUCKET}/rt/snap")
    _, stats = upload(store, prefix, tmp_path / "mem")
    assert stats.sent == 15 and stats.zero_chunks == 1
    src = ChunkSource(store, load_manifest(store, prefix),
                      ChunkCache(tmp_path / "cache", 8 << 20), workers=4)
    try:
        out = bytearray(len(data))
        src.read_into(0, memoryview(out))
        st = src.stats()
        assert out == data and st["chunks_fetched"] == 15 and st["hash_failures"] == 0
        assert st["bytes_fetched"] == 15 * CHUNK
    finally:
        src.close()


def test_a_patched_diff_round_trip(seaweed: SeaweedServer, s3_env: dict[str, str],
                                   tmp_path: Path) -> None:
    """Page-granular diffs against the real store: scattered pages rewritten, the diff's
    chunks stored as patches, every chunk rebuilt and verified on read."""
    data = bytearray(memory_file(tmp_path / "mem", 1024, seed=13))
    store, _ = open_store(f"s3://{BUCKET}/diff/one")
    first, _ = upload(store, "diff/one", tmp_path / "mem")
    written = np.zeros(len(data) // 4096, dtype=np.bool_)
    for page in range(3, 1024, 37):
        data[page * 4096:(page + 1) * 4096] = bytes([page % 251 + 1]) * 4096
        written[page] = True
    (tmp_path / "mem").write_bytes(data)
    second, stats = upload(store, "diff/two", tmp_path / "mem", base=first, changed=written)
    # 15 chunks patched; the one that was zeros has no root to patch: it goes up whole.
    assert (stats.patched, stats.sent) == (15, 1) and second.patched == 15
    src = ChunkSource(store, load_manifest(store, "diff/two"), None, workers=4)
    try:
        out = bytearray(len(data))
        src.read_into(0, memoryview(out))
        assert out == data and src.stats()["hash_failures"] == 0
    finally:
        src.close()


def test_store_stopped_mid_restore_blocks_then_serves(seaweed: SeaweedServer,
                                                      s3_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    data = memory_file(tmp_path / "mem", 512, seed=12)
    store, prefix = open_store(f"s3://{BUCKET}/outage/snap")
    manifest, _ = upload(store, prefix, tmp_path / "mem")
    src = ChunkSource(store, manifest, ChunkCache(tmp_path / "cache", 8 << 20),
                      backoff_initial=0.05, backoff_max=0.5)
    out = bytearray(b"\xaa" * (2 * CHUNK))
    src.read_into(0, memoryview(out)[:PAGE])            # the restore has begun
    assert out[:PAGE] == data[:PAGE]
    seaweed.stop()
    try:
        reader = threading.Thread(target=src.read_into,
                                  args=(4 * CHUNK, memoryview(out)), daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while int(src.stats()["retries"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = src.stats()
        assert reader.is_alive() and int(stats["retries"]) >= 3 and stats["waiting"] == 1
        assert stats["last_error"] and out[PAGE:] == b"\xaa" * (2 * CHUNK - PAGE)
    finally:
        seaweed.start()
    reader.join(30)
    assert not reader.is_alive()
    assert out == data[4 * CHUNK:6 * CHUNK]
    src.close()


def test_chunk_corrupted_in_the_store_never_served(seaweed: SeaweedServer,
                                                   s3_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    data = memory_file(tmp_path / "mem", 256, seed=13)
    store, prefix = open_store(f"s3://{BUCKET}/corrupt/snap")
    manifest, _ = upload(store, prefix, tmp_path / "mem")
    key = manifest.chunk_key(manifest.regions[0].chunks[0] or "")
    good = store.get(key)
    store.put(key, good[:100] + bytes([good[100] ^ 1]) + good[101:])   # one bit
    src = ChunkSource(store, manifest, ChunkCache(tmp_path / "cache", 8 << 20),
                      backoff_initial=0.02, backoff_max=0.1)
    out = bytearray(PAGE)
    reader = threading.Thread(target=src.read_into, args=(0, memoryview(out)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while int(src.stats()["hash_failures"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reader.is_alive() and int(src.stats()["hash_failures"]) >= 2
    assert out == bytes(PAGE) and src.cache is not None and len(src.cache) == 0
    store.put(key, good)
    reader.join(10)
    assert not reader.is_alive() and out == data[:PAGE]
    src.close()


def test_interrupted_upload_then_resumed(seaweed: SeaweedServer, s3_env: dict[str, str],
                                         tmp_path: Path) -> None:
    memory_file(tmp_path / "mem", 1024, seed=14)
    store, prefix = open_store(f"s3://{BUCKET}/interrupted/snap")
    with pytest.raises(StoreUnavailable):
        upload(FaultyStore(store, put_fails=after_puts(6)), prefix, tmp_path / "mem")  # type: ignore[arg-type]
    assert store.head(join(prefix, MANIFEST)) is None
    with pytest.raises(ManifestError, match="did not finish"):
        load_manifest(store, prefix)
    manifest, stats = upload(store, prefix, tmp_path / "mem")
    assert stats.present == 6 and stats.sent == 15 - 6
    assert load_manifest(store, prefix) == manifest
