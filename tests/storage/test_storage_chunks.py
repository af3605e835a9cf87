"""The store tier on the local-directory backend: chunking, dedup, diffs, uploads that stop
midway, the chunk source's verification, retries and cache. (tests/storage/test_storage_s3.py
runs the same paths against SeaweedFS.)"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from store_faults import FaultyStore, after_puts

from vmmswap.snapshot.source import FileSource, SourceError
from vmmswap.storage.cache import CacheBusy, ChunkCache
from vmmswap.storage.chunk_source import ChunkSource
from vmmswap.storage.manifest import (
    MANIFEST,
    ChunkedRegion,
    Manifest,
    ManifestError,
    chunk_hash,
    load_file,
    load_manifest,
)
from vmmswap.storage.store import LocalStore, ObjectStore, StoreUnavailable, join, open_store
from vmmswap.storage.upload import upload_memory

CHUNK = 64 * 1024
PAGE = 4096


def memory_file(path: Path, pages: int, seed: int, zero_every: int = 4) -> bytes:
    """Random pages, with every ``zero_every``-th chunk all zeros and a hole at the end."""
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, pages * PAGE, dtype=np.uint8).tobytes())
    per = CHUNK // PAGE
    for c in range(zero_every - 1, pages // per, zero_every):
        data[c * CHUNK:(c + 1) * CHUNK] = bytes(CHUNK)
    path.write_bytes(data)
    with open(path, "r+b") as f:
        f.truncate(len(data) + 3 * CHUNK)    # a sparse tail
    return bytes(data) + bytes(3 * CHUNK)


def upload(store: ObjectStore, prefix: str, path: Path, **kw: object):  # type: ignore[no-untyped-def]
    src = FileSource.open(path)
    try:
        return upload_memory(store, prefix, src, chunk_size=CHUNK, workers=4, **kw)  # type: ignore[arg-type]
    finally:
        src.close()


def read_all(source: ChunkSource, step: int = 3 * PAGE + 512) -> bytes:
    out = bytearray(source.size)
    view = memoryview(out)
    for at in range(0, source.size, step):
        source.read_into(at, view[at:at + step])
    return bytes(out)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_round_trip_zero_chunks_not_stored(store: LocalStore, tmp_path: Path) -> None:
    data = memory_file(tmp_path / "mem", 256, seed=1)
    manifest, stats = upload(store, "vm1/snap1", tmp_path / "mem",
                             regions=[(0, 96 * PAGE), (96 * PAGE, len(data) - 96 * PAGE)])
    assert load_manifest(store, "vm1/snap1") == manifest
    stored = list(store.list("vm1/chunks/"))
    nonzero = {chunk_hash(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)
               if any(data[i:i + CHUNK])}
    assert {k.rpartition("/")[2] for k, _ in stored} == nonzero
    assert stats.zero_chunks > 3 and stats.sent == len(nonzero)
    assert manifest.regions[1].offset == 96 * PAGE
    src = ChunkSource(store, manifest, ChunkCache(tmp_path / "cache", 1 << 20), workers=3)
    try:
        assert src.size == len(data)
        assert read_all(src) == data
        with pytest.raises(SourceError):
            src.read_into(len(data) - 10, memoryview(bytearray(20)))
    finally:
        src.close()


def test_two_snapshots_share_chunks_and_a_diff_sends_only_new_ones(
        store: LocalStore, tmp_path: Path) -> None:
    data = bytearray(memory_file(tmp_path / "mem", 512, seed=2, zero_every=1000))
    first, s1 = upload(store, "vm/a", tmp_path / "mem")
    written = np.zeros(len(data) // PAGE, dtype=np.bool_)
    for page in (5, 6, 200, 201, 202, 400):          # 6 pages in 3 chunks
        data[page * PAGE:(page + 1) * PAGE] = bytes([page % 251 + 1]) * PAGE
        written[page] = True
    (tmp_path / "mem").write_bytes(data)
    second, s2 = upload(store, "vm/b", tmp_path / "mem", base=first, changed=written,
                        parent="vm/a")
    # The three chunks go up as patches over the first snapshot's (test_storage_patches.py).
    assert s2.sent == 0 and s2.patched == 3 and s2.reused == s1.sent - 3 + s1.zero_chunks
    assert s2.bytes_read == 3 * CHUNK
    patches = s2.bytes_sent
    assert patches < 3 * CHUNK // 2
    # A full (non-diff) upload of the same memory knows no base: it stores those three whole
    # (their patches are not theirs to find) and finds every other chunk present.
    third, s3 = upload(store, "vm/c", tmp_path / "mem")
    assert s3.sent == 3 and third.digests() == second.digests() and third.patched == 0
    pool = sum(size for _, size in store.list("vm/chunks/"))
    assert pool == first.stored_bytes() + patches + 3 * CHUNK
    src = ChunkSource(store, second, None)
    try:
        assert read_all(src) == bytes(data)
    finally:
        src.close()


def test_interrupted_upload_is_no_snapshot_and_resumes(store: LocalStore, tmp_path: Path) -> None:
    memory_file(tmp_path / "mem", 256, seed=3)
    with pytest.raises(StoreUnavailable):
        upload(FaultyStore(store, put_fails=after_puts(5)), "vm/s", tmp_path / "mem")  # type: ignore[arg-type]
    assert store.head(join("vm/s", MANIFEST)) is None
    with pytest.raises(ManifestError, match="did not finish"):
        load_manifest(store, "vm/s")
    left = len(list(store.list("vm/chunks/")))
    assert left > 0
    manifest, stats = upload(store, "vm/s", tmp_path / "mem")
    assert stats.present == left and stats.sent > 0
    assert load_manifest(store, "vm/s") == manifest


def test_a_failed_chunk_is_never_followed_by_a_manifest(store: LocalStore,
                                                         tmp_path: Path) -> None:
    """Every chunk went up and only the manifest PUT failed: still no snapshot; with one PUT
    more allowed (the control) the same upload is one."""
    memory_file(tmp_path / "mem", 64, seed=4, zero_every=1000)   # 4 chunks stored
    with pytest.raises(StoreUnavailable):
        upload(FaultyStore(store, put_fails=after_puts(4)), "vm/s", tmp_path / "mem")  # type: ignore[arg-type]
    assert len(list(store.list("vm/chunks/"))) == 4
    assert store.head(join("vm/s", MANIFEST)) is None
    upload(FaultyStore(store, put_fails=after_puts(1)), "vm/s", tmp_path / "mem")  # type: ignore[arg-type]
    assert load_manifest(store, "vm/s").size == 64 * PAGE + 3 * CHUNK


def corrupt_first_chunk(store: LocalStore, manifest: Manifest) -> str:
    digest = next(c for c in manifest.regions[0].chunks if c is not None)
    key = manifest.chunk_key(digest)
    good = store.get(key)
    store.put(key, bytes([good[0] ^ 0xFF]) + good[1:])
    return key


def test_corrupt_chunk_counted_retried_never_served(store: LocalStore, tmp_path: Path) -> None:
    data = memory_file(tmp_path / "mem", 64, seed=5, zero_every=1000)
    manifest, _ = upload(store, "vm/s", tmp_path / "mem")
    key = corrupt_first_chunk(store, manifest)
    good = bytes(data[:CHUNK])
    src = ChunkSource(store, manifest, None, backoff_initial=0.01, backoff_max=0.05)
    out = bytearray(PAGE)
    reader = threading.Thread(target=src.read_into, args=(0, memoryview(out)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while int(src.stats()["hash_failures"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = src.stats()
    assert int(stats["hash_failures"]) >= 3 and reader.is_alive() and out == bytes(PAGE)
    assert "failed its hash" in str(stats["last_error"]) and int(stats["waiting"]) == 1
    store.put(key, good)                        # the store heals
    reader.join(10)
    assert not reader.is_alive() and out == data[:PAGE]
    src.close()


def test_control_without_verification_serves_the_corrupt_chunk(
        store: LocalStore, tmp_path: Path) -> None:
    data = memory_file(tmp_path / "mem", 64, seed=6, zero_every=1000)
    manifest, _ = upload(store, "vm/s", tmp_path / "mem")
    corrupt_first_chunk(store, manifest)

    class Unverified(ChunkSource):
        @staticmethod
        def _verified(data: bytes, digest: str, length: int) -> bool:
            return True

    src = Unverified(store, manifest, None)
    out = bytearray(PAGE)
    src.read_into(0, memoryview(out))
    src.close()
    assert out != data[:PAGE]    # exactly what verification keeps from the guest


def test_store_outage_blocks_reads_then_serves_real_data(store: LocalStore,
                                                         tmp_path: Path) -> None:
    data = memory_file(tmp_path / "mem", 128, seed=7, zero_every=1000)
    manifest, _ = upload(store, "vm/s", tmp_path / "mem")
    down = threading.Event()
    flaky = FaultyStore(store, get_fails=lambda _key: down.is_set())
    src = ChunkSource(flaky, manifest, None, backoff_initial=0.01, backoff_max=0.1)  # type: ignore[arg-type]
    out = bytearray(2 * CHUNK)
    src.read_into(0, memoryview(out)[:PAGE])           # fine while up
    down.set()
    reader = threading.Thread(target=src.read_into, args=(CHUNK, memoryview(out)), daemon=True)
    reader.start()
    time.sleep(0.5)
    assert reader.is_alive() and int(src.stats()["retries"]) >= 3
    assert out[:] == data[:PAGE] + bytes(2 * CHUNK - PAGE)   # nothing written meanwhile
    down.clear()
    reader.join(10)
    assert not reader.is_alive() and out == data[CHUNK:3 * CHUNK]
    src.close()


def test_give_up_raises_instead_of_serving(store: LocalStore, tmp_path: Path) -> None:
    memory_file(tmp_path / "mem", 32, seed=8, zero_every=1000)
    manifest, _ = upload(store, "vm/s", tmp_path / "mem")
    down = threading.Event()
    flaky = FaultyStore(store, get_fails=lambda _key: down.is_set())
    down.set()
    src = ChunkSource(flaky, manifest, None, backoff_initial=0.01, give_up_after=0.2)  # type: ignore[arg-type]
    out = bytearray(b"\xaa" * PAGE)
    with pytest.raises(SourceError, match="gave up"):
        src.read_into(0, memoryview(out))
    assert out == b"\xaa" * PAGE
    src.close()


def test_prefetch_fills_the_cache_ahead_of_reads(store: LocalStore, tmp_path: Path) -> None:
    data = memory_file(tmp_path / "mem", 256, seed=9, zero_every=1000)
    manifest, _ = upload(store, "vm/s", tmp_path / "mem")
    src = ChunkSource(store, manifest, ChunkCache(tmp_path / "cache", 4 << 20))
    pages = np.arange(16, 160, dtype=np.uint64)
    assert src.prefetch(pages * np.uint64(PAGE)) == 9      # pages 16..159: chunks 1..9
    assert src.wait_prefetched(10)
    assert int(src.stats()["chunks_fetched"]) == 9
    out = bytearray(PAGE)
    src.read_into(40 * PAGE, memoryview(out))
    stats = src.stats()
    assert out == data[40 * PAGE:41 * PAGE] and stats["chunks_fetched"] == 9
    assert stats["cache_hits"] == 1
    src.close()


def test_demand_read_takes_over_a_queued_prefetch(store: LocalStore, tmp_path: Path) -> None:
    """A read of a chunk still waiting in the prefetch queue cancels that prefetch and fetches
    it on the demand pool (a regression: the cancel ran the done callback under the source's
    lock, and the read deadlocked)."""
    data = memory_file(tmp_path / "mem", 256, seed=10, zero_every=1000)
    manifest, _ = upload(store, "vm/s", tmp_path / "mem")
    src = ChunkSource(FaultyStore(store, get_delay=0.05), manifest,  # type: ignore[arg-type]
                      ChunkCache(tmp_path / "cache", 4 << 20), prefetch_workers=1)
    try:
        assert src.prefetch(np.arange(0, 256, 16, dtype=np.uint64) * np.uint64(PAGE)) == 16
        out = bytearray(PAGE)
        reader = threading.Thread(target=src.read_into, args=(250 * PAGE, memoryview(out)),
                                  daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "the demand read hung behind the prefetch queue"
        assert out == data[250 * PAGE:251 * PAGE]
        assert int(src.stats()["chunks_fetched"]) < 16    # it did not wait for the queue
    finally:
        src.close()


def test_ready_says_whether_a_read_would_wait(store: LocalStore, tmp_path: Path) -> None:
    """The handler's prefetch reads only what is ready, so demand faults never queue behind a
    read that waits for the store."""
    memory_file(tmp_path / "mem", 64, seed=12, zero_every=4)   # chunk 3 is zeros
    manifest, _ = upload(store, "vm/s", tmp_path / "mem")
    src = ChunkSource(FaultyStore(store, get_delay=0.2), manifest,  # type: ignore[arg-type]
                      ChunkCache(tmp_path / "cache", 4 << 20))
    try:
        assert src.ready(3 * CHUNK, CHUNK)                  # zeros: nothing to fetch
        assert not src.ready(0, PAGE)
        src.prefetch(np.array([0], dtype=np.uint64))
        assert not src.ready(0, PAGE)                       # still on its way
        assert src.wait_prefetched(10)
        assert src.ready(0, CHUNK) and not src.ready(0, CHUNK + PAGE)
    finally:
        src.close()
    nocache = ChunkSource(store, manifest, None)
    try:
        assert nocache.ready(0, PAGE)   # cannot tell: a read simply blocks
    finally:
        nocache.close()


def test_cache_is_bounded_lru_and_rechecks_what_it_finds(tmp_path: Path) -> None:
    chunks = [bytes([i]) * CHUNK for i in range(1, 6)]
    cache = ChunkCache(tmp_path / "c", 3 * CHUNK)
    with pytest.raises(CacheBusy):
        ChunkCache(tmp_path / "c", CHUNK)
    for c in chunks[:3]:
        cache.insert(chunk_hash(c), c)
    out = bytearray(8)
    assert cache.read(chunk_hash(chunks[0]), 0, memoryview(out))   # 0 is now most recent
    cache.insert(chunk_hash(chunks[3]), chunks[3])
    assert chunk_hash(chunks[1]) not in cache and chunk_hash(chunks[0]) in cache
    assert cache.bytes == 3 * CHUNK and cache.evictions == 1
    cache.close()
    bad = tmp_path / "c" / chunk_hash(chunks[0])
    bad.write_bytes(b"\x00" + chunks[0][1:])     # damaged while nobody owned the cache
    again = ChunkCache(tmp_path / "c", 3 * CHUNK)
    assert len(again) == 3
    assert not again.read(chunk_hash(chunks[0]), 0, memoryview(out))
    assert again.dropped == 1 and not bad.exists()
    assert again.read(chunk_hash(chunks[3]), 10, memoryview(out)) and out == chunks[3][:8]
    again.close()


def test_open_store_and_manifest_validation(tmp_path: Path) -> None:
    store, prefix = open_store(str(tmp_path / "d"))
    assert isinstance(store, LocalStore) and prefix == ""
    with pytest.raises(ValueError, match="unsupported"):
        open_store("gs://x/y")
    with pytest.raises(ManifestError):
        Manifest.from_json(b'{"format": "other"}')
    good = Manifest(CHUNK, (), "p").to_json()
    assert Manifest.from_json(good).pool == "p"
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.from_json(b"not json")


def test_a_failed_re_upload_leaves_the_old_snapshot_whole(store: LocalStore,
                                                         tmp_path: Path) -> None:
    """Uploading again to the same prefix must not change a file the old manifest names: if the
    new manifest never arrives, the old memory and the old state still go together."""
    memory_file(tmp_path / "mem", 64, seed=15)
    src = FileSource.open(tmp_path / "mem")
    try:
        upload_memory(store, "vm/s", src, chunk_size=CHUNK, files={"state": b"STATE-A"})
        with pytest.raises(StoreUnavailable):
            cut = FaultyStore(store, put_fails=lambda key: key.endswith(MANIFEST))
            upload_memory(cut, "vm/s", src,  # type: ignore[arg-type]
                          chunk_size=CHUNK, files={"state": b"STATE-B"})
    finally:
        src.close()
    manifest = load_manifest(store, "vm/s")
    assert load_file(store, manifest, "state") == b"STATE-A"
    key = manifest.files["state"]
    store.put(key, b"STATE-X")           # negative control: the hash in the key catches it
    with pytest.raises(ManifestError, match="does not match"):
        load_file(store, manifest, "state")


def test_a_diff_must_share_its_base_pool(store: LocalStore, tmp_path: Path) -> None:
    memory_file(tmp_path / "mem", 64, seed=16)
    base, _ = upload(store, "vm1/mon", tmp_path / "mem")
    src = FileSource.open(tmp_path / "mem")
    try:
        with pytest.raises(ValueError, match="pool"):
            upload_memory(store, "vm2/tue", src, chunk_size=CHUNK, base=base,
                          changed=np.zeros(64, dtype=np.bool_))
    finally:
        src.close()
    with pytest.raises(ManifestError):
        load_manifest(store, "vm2/tue")     # nothing was written


def test_manifest_pool_and_file_keys_are_validated() -> None:
    good = Manifest(CHUNK, (ChunkedRegion(0, CHUNK, (None,)),), "vm/chunks")
    assert Manifest.from_json(good.to_json()) == good
    for pool in ("../x", "/abs", "a//b", "a/./b"):
        bad = Manifest(CHUNK, good.regions, pool)
        with pytest.raises(ManifestError, match="pool"):
            Manifest.from_json(bad.to_json())
    with pytest.raises(ManifestError, match="content-addressed"):
        Manifest.from_json(Manifest(CHUNK, good.regions, "p", {"s": "vm/s/state"}).to_json())


def test_cache_directory_is_private(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c", 1 << 20)
    cache.insert(chunk_hash(b"x" * 10), b"x" * 10)
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o700
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in (tmp_path / "c").iterdir())
    cache.close()
    open_dir = tmp_path / "shared"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(PermissionError, match="0700"):
        ChunkCache(open_dir, 1 << 20)


def test_readahead_span_stops_at_the_first_chunk_to_fetch(store: LocalStore,
                                                          tmp_path: Path) -> None:
    """A readahead run never reaches into a chunk a read would have to fetch, except the
    faulting byte's own chunk; zero and cached chunks on either side stay in it."""
    memory_file(tmp_path / "mem", 128, seed=13, zero_every=4)   # chunks 3 and 7 are zeros
    manifest, _ = upload(store, "vm/s", tmp_path / "mem")
    src = ChunkSource(store, manifest, ChunkCache(tmp_path / "cache", 4 << 20))
    try:
        # Nothing cached: the fault's chunk only, wherever the run starts and ends.
        assert src.readahead_span(CHUNK - PAGE, 2 * CHUNK, CHUNK - PAGE) == (CHUNK - PAGE, CHUNK)
        assert src.readahead_span(0, 3 * CHUNK, CHUNK + PAGE) == (CHUNK, 2 * CHUNK)
        # A zero chunk next door costs nothing: the run goes on through it, and a cached one.
        assert src.readahead_span(2 * CHUNK, 3 * CHUNK, 2 * CHUNK) == (2 * CHUNK, 4 * CHUNK)
        src.prefetch(np.array([4 * CHUNK], dtype=np.uint64))
        assert src.wait_prefetched(10)
        assert src.readahead_span(2 * CHUNK, 4 * CHUNK, 2 * CHUNK) == (2 * CHUNK, 5 * CHUNK)
        # A run inside one chunk, and bad focus, come back whole.
        assert src.readahead_span(PAGE, 2 * PAGE, PAGE) == (PAGE, 3 * PAGE)
        assert src.readahead_span(0, CHUNK, 5 * CHUNK) == (0, CHUNK)
        assert src.stats()["chunks_fetched"] == 1   # asking fetched nothing
    finally:
        src.close()
    nocache = ChunkSource(store, manifest, None)
    try:   # every read fetches anyway: the next chunk comes along ahead of demand
        assert nocache.readahead_span(0, 3 * CHUNK, 0) == (0, 3 * CHUNK)
    finally:
        nocache.close()
