"""Page-granular diffs: a chunk stored as a patch over the whole chunk its base snapshot had.

On the local-directory store: a diff upload that knows the written pages stores scattered
rewrites as patches (10 % of pages at random: ~1.1x one snapshot, not 2x); a third snapshot
patches the same root with the pages of both diffs; every read rebuilds the chunk and checks it
against the chunk's own hash. A corrupt patch is counted and never served; a written-page map
that missed a page makes the rebuilt chunk fail its hash (and the control without that check
serves the stale page); malformed patches and manifests are refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_storage_chunks import CHUNK, PAGE, read_all

from vmmswap.snapshot.source import FileSource, SourceError
from vmmswap.storage.cache import ChunkCache
from vmmswap.storage.chunk_source import ChunkSource
from vmmswap.storage.manifest import FORMAT, Manifest, ManifestError, load_manifest
from vmmswap.storage.patch import PatchError, apply_patch, encode_patch, patch_bytes
from vmmswap.storage.store import LocalStore, join
from vmmswap.storage.upload import upload_memory

PAGES = 64 * CHUNK // PAGE   # 4 MiB of 64 KiB chunks


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _put(store: LocalStore, prefix: str, path: Path, **kw: object) -> Manifest:
    src = FileSource.open(path)
    try:
        manifest, _ = upload_memory(store, prefix, src, chunk_size=CHUNK, workers=4,
                                    **kw)  # type: ignore[arg-type]
    finally:
        src.close()
    return manifest


def _rewrite(path: Path, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Rewrite ``fraction`` of the pages at random; the written-page map."""
    changed = np.zeros(PAGES, dtype=np.bool_)
    with open(path, "r+b") as f:
        for p in rng.choice(PAGES, int(PAGES * fraction), replace=False):
            f.seek(int(p) * PAGE)
            f.write(rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes())
            changed[p] = True
    return changed


def _source(store: LocalStore, prefix: str, tmp: Path | None = None,
            **kw: object) -> ChunkSource:
    cache = ChunkCache(tmp, 64 << 20) if tmp is not None else None
    return ChunkSource(store, load_manifest(store, prefix), cache, **kw)  # type: ignore[arg-type]


def test_patch_object_round_trip_and_refusals() -> None:
    rng = np.random.default_rng(1)
    root = rng.integers(0, 256, CHUNK, dtype=np.uint8).tobytes()
    new = bytearray(root)
    pages = np.zeros(CHUNK // PAGE, dtype=np.bool_)
    for p in (0, 5, 15):
        new[p * PAGE:(p + 1) * PAGE] = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
        pages[p] = True
    patch = encode_patch(bytes(new), pages)
    assert len(patch) == patch_bytes(CHUNK, 3)
    assert apply_patch(root, patch) == bytes(new)
    for bad, why in ((b"XXXX" + patch[4:], "not a patch"), (patch[:-1], "must be"),
                     (patch[:10], "no header")):
        with pytest.raises(PatchError, match=why):
            apply_patch(root, bad)
    with pytest.raises(PatchError, match="its root has"):
        apply_patch(root[:-PAGE], patch)
    miscount = bytearray(patch)
    miscount[16] ^= 0x02          # one more page in the map than the header says
    with pytest.raises(PatchError, match="names"):
        apply_patch(root, bytes(miscount))


def test_scattered_rewrites_are_stored_as_patches(store: LocalStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    mem = tmp_path / "mem"
    mem.write_bytes(rng.integers(0, 256, PAGES * PAGE, dtype=np.uint8).tobytes())
    one = _put(store, "vm/one", mem)
    changed = _rewrite(mem, rng, 0.10)
    two = _put(store, "vm/two", mem, base=one, changed=changed)
    touched = int(changed.reshape(-1, CHUNK // PAGE).any(axis=1).sum())
    assert two.patched == touched and "vmmswap-chunked-memory/2" in two.to_json().decode()
    # The pool now holds both snapshots: the roots once, plus the patches.
    ratio = two.stored_bytes() / one.stored_bytes()
    assert ratio < 1.15, ratio
    src = _source(store, "vm/two", tmp_path / "cache")
    try:
        assert read_all(src) == mem.read_bytes()
        assert src.stats()["hash_failures"] == 0
    finally:
        src.close()
    # A third snapshot: more pages written; patches over the same roots carry both diffs.
    changed3 = _rewrite(mem, rng, 0.05)
    three = _put(store, "vm/three", mem, base=two, changed=changed3)
    roots = {p.base for r in three.regions for p in r.patches if p is not None}
    assert roots <= one.digests()
    src = _source(store, "vm/three")
    try:
        assert read_all(src, step=CHUNK) == mem.read_bytes()
        # Each chunk: its root and one patch, never more.
        assert int(src.stats()["bytes_fetched"]) <= three.stored_bytes()
    finally:
        src.close()


def test_a_corrupt_patch_is_never_served(store: LocalStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mem = tmp_path / "mem"
    mem.write_bytes(rng.integers(0, 256, PAGES * PAGE, dtype=np.uint8).tobytes())
    one = _put(store, "vm/one", mem)
    two = _put(store, "vm/two", mem, base=one, changed=_rewrite(mem, rng, 0.02))
    patch = next(p for r in two.regions for p in r.patches if p is not None)
    path = Path(store.root) / join(two.pool, patch.patch)
    good = path.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    path.write_bytes(bytes(bad))
    src = _source(store, "vm/two", give_up_after=0.3, backoff_initial=0.01)
    try:
        with pytest.raises(SourceError, match="failed its hash"):
            read_all(src, step=CHUNK)
        assert int(src.stats()["hash_failures"]) > 0
    finally:
        src.close()
    path.write_bytes(good)
    src = _source(store, "vm/two")
    try:
        assert read_all(src) == mem.read_bytes()
    finally:
        src.close()


def test_a_missed_written_page_fails_the_rebuilt_chunk(store: LocalStore,
                                                       tmp_path: Path) -> None:
    """The page map is the uploader's word, not trusted: one written page left out of it makes
    the rebuilt chunk differ from the chunk's hash -- never served. The control without that
    last check serves the stale page."""
    rng = np.random.default_rng(4)
    mem = tmp_path / "mem"
    mem.write_bytes(rng.integers(0, 256, PAGES * PAGE, dtype=np.uint8).tobytes())
    one = _put(store, "vm/one", mem)
    changed = _rewrite(mem, rng, 0.05)
    lost = int(np.flatnonzero(changed)[0])
    changed[lost] = False
    changed[lost ^ 1] = True        # the chunk is still a diff, just without that page
    _put(store, "vm/two", mem, base=one, changed=changed)
    src = _source(store, "vm/two", give_up_after=0.3, backoff_initial=0.01)
    try:
        with pytest.raises(SourceError, match="rebuilt"):
            read_all(src, step=CHUNK)
    finally:
        src.close()

    class Unverified(ChunkSource):
        @staticmethod
        def _verified(data: bytes, digest: str, length: int) -> bool:
            return True

    control = Unverified(store, load_manifest(store, "vm/two"), None)
    try:
        got = read_all(control, step=CHUNK)
        want = mem.read_bytes()
        assert got[lost * PAGE:(lost + 1) * PAGE] != want[lost * PAGE:(lost + 1) * PAGE]
    finally:
        control.close()


def test_patched_manifests_are_validated(store: LocalStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    mem = tmp_path / "mem"
    mem.write_bytes(rng.integers(0, 256, PAGES * PAGE, dtype=np.uint8).tobytes())
    one = _put(store, "vm/one", mem)
    two = _put(store, "vm/two", mem, base=one, changed=_rewrite(mem, rng, 0.02))
    doc = two.to_json().decode()
    assert Manifest.from_json(doc.encode()).patched == two.patched
    with pytest.raises(ManifestError, match="patches in a"):
        Manifest.from_json(doc.replace("vmmswap-chunked-memory/2", FORMAT).encode())
    p = next(p for p in two.regions[0].patches if p is not None)
    with pytest.raises(ManifestError, match="cannot be"):
        Manifest.from_json(doc.replace(f'"bytes":{p.nbytes}', '"bytes":5', 1).encode())
    with pytest.raises(ManifestError, match=r"page map|not hex"):
        Manifest.from_json(doc.replace(p.pages, "zz" + p.pages[2:], 1).encode())


def test_store_put_as_a_diff_from_the_command_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    mem = tmp_path / "mem"
    mem.write_bytes(rng.integers(0, 256, PAGES * PAGE, dtype=np.uint8).tobytes())
    root = tmp_path / "store"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmmswap.cli", "store", *args],
                              capture_output=True, text=True, timeout=60, check=False)

    one = f"file://{root}/vm/one"
    assert cli("put", str(mem), f"{root}", "--chunk-kib", "64").returncode == 0
    np.save(tmp_path / "changed.npy", _rewrite(mem, rng, 0.05))
    half = cli("put", str(mem), f"{root}/x", "--base", one)
    assert half.returncode == 1 and "needs both" in half.stderr, half.stderr
    # A directory store holds one snapshot (at its root): the diff replaces it, over the
    # chunks the pool already has.
    base = cli("put", str(mem), str(root), "--base", str(root), "--changed",
               str(tmp_path / "changed.npy"), "--chunk-kib", "64")
    assert base.returncode == 0, base.stderr
    assert json.loads(base.stdout.splitlines()[-1])["patched"] > 0
    info = json.loads(cli("info", str(root)).stdout.splitlines()[-1])
    assert info["patched_chunks"] > 0 and info["parent"] == str(root)
    got = cli("get", str(root), str(tmp_path / "back"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "back").read_bytes() == mem.read_bytes()
