"""Park on one "host", resume on another: the micro-VM's memory and state through SeaweedFS.

Each host is a process of its own with its own temporary directory and chunk cache; only the
store is shared. ``vmmswap park`` snapshots the running built-in guest (after it wrote and
checksummed its memory) into the store and keeps nothing locally; ``vmmswap resume`` on the
other host restores it lazily through Firecracker's handshake with chunks fetched on demand,
and the guest verifies every checksum. Negative control: a manifest that names another
(perfectly valid) chunk in one place makes the guest's check fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from seaweed import BUCKET, SeaweedServer

from vmmswap.storage.manifest import ChunkedRegion, load_manifest, save_manifest
from vmmswap.storage.store import join, open_store

pytest.importorskip("obstore", reason="obstore is not installed (the s3 / dev extra)")
pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm"),
              pytest.mark.timeout(600)]
TIMEOUT = 300


def _host(name: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``vmmswap ARGS`` as host ``name``: its own TMPDIR (where park and resume keep their
    working files) and nothing else shared but the store."""
    home = tmp / name
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(home / "tmp")}
    return subprocess.run([sys.executable, "-m", "vmmswap.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env, check=False)


def test_park_here_resume_there(seaweed: SeaweedServer, s3_env: dict[str, str],
                                tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/park/vm1/now"
    parked = _host("a", tmp_path, "park", url, "--memory", "64", "--vcpus", "2")
    assert parked.returncode == 0, parked.stderr
    up = json.loads(parked.stdout.splitlines()[-1])
    assert up["sent"] > 0 and up["checksums"] > 0 and up["memory_bytes"] >= 64 << 20
    assert list((tmp_path / "a" / "tmp").iterdir()) == []     # nothing of the VM stays on a

    cache = tmp_path / "b" / "cache"
    resumed = _host("b", tmp_path, "resume", url, "--cache-dir", str(cache))
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout.splitlines()[-1])
    assert out["ok"] is True, out["check"]
    handler = out["handler"]
    assert handler["source_chunks_fetched"] > 0 and handler["source_hash_failures"] == 0
    assert 0 < handler["source_bytes_fetched"] <= up["stored_bytes"]
    assert any(cache.iterdir())

    # The same guest parked again (from host b now) shares the pool: the chunks whose bytes did
    # not change are not sent again.
    again = _host("b", tmp_path, "park", f"s3://{BUCKET}/park/vm1/again", "--memory", "64",
                  "--vcpus", "2")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout.splitlines()[-1])
    assert second["present"] > 0 and second["sent"] < up["sent"], second


def test_negative_control_a_wrong_chunk_fails_the_guest_check(
        seaweed: SeaweedServer, s3_env: dict[str, str], tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/park/vm2/now"
    parked = _host("a", tmp_path, "park", url, "--memory", "64", "--vcpus", "1",
                   "--regions", "1", "--written", "0.9")
    assert parked.returncode == 0, parked.stderr
    store, prefix = open_store(url)
    manifest = load_manifest(store, prefix)
    region = manifest.regions[0]
    chunks = list(region.chunks)
    data = [i for i, c in enumerate(chunks) if c is not None]
    # Swap two written chunks: each still passes its hash, but sits in the wrong place.
    a, b = data[len(data) // 2], data[-1]
    assert chunks[a] != chunks[b]
    chunks[a], chunks[b] = chunks[b], chunks[a]
    tampered = type(manifest)(manifest.chunk_size,
                              (ChunkedRegion(region.offset, region.size, tuple(chunks)),
                               *manifest.regions[1:]), manifest.pool, manifest.files,
                              manifest.parent)
    save_manifest(store, prefix, tampered)
    assert store.head(join(prefix, "manifest.json"))
    resumed = _host("b", tmp_path, "resume", url, "--cache-dir", str(tmp_path / "b" / "c"))
    assert resumed.returncode == 1, resumed.stdout
    out = json.loads(resumed.stdout.splitlines()[-1])
    assert out["ok"] is False and "check failed" in resumed.stderr


def test_a_failed_park_keeps_the_snapshot(seaweed: SeaweedServer, s3_env: dict[str, str],
                                          tmp_path: Path) -> None:
    """The VM is stopped once its snapshot is written: if the upload then fails, the snapshot
    is the only copy and must stay (named in the error), to be parked later with --from."""
    failed = _host("a", tmp_path, "park", "/proc/vmmswap-not-a-store/x", "--memory", "64",
                   "--vcpus", "1", "--regions", "1")
    assert failed.returncode == 1
    assert "kept in" in failed.stderr, failed.stderr
    kept = Path(failed.stderr.split("kept in ")[1].split(":")[0])
    assert (kept / "memory").exists() and (kept / "vmstate.json").exists()
    url = f"s3://{BUCKET}/park/vm3/now"
    later = _host("a", tmp_path, "park", url, "--from", str(kept))
    assert later.returncode == 0, later.stderr
    resumed = _host("b", tmp_path, "resume", url, "--cache-dir", str(tmp_path / "b" / "c3"))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["ok"] is True



def test_park_a_swapped_out_vm_here_resume_there(seaweed: SeaweedServer,
                                                 s3_env: dict[str, str],
                                                 tmp_path: Path) -> None:
    """A VM under vmm-swap parks from staging and the swap file: its memory is swapped out
    first, and the park reads it where it lies (no page back into RAM); host b resumes it."""
    url = f"s3://{BUCKET}/park/swapped/now"
    parked = _host("a", tmp_path, "park", url, "--swapped", "--memory", "64", "--vcpus", "2",
                   "--swap-dir", str(tmp_path / "a"))
    assert parked.returncode == 0, parked.stderr
    up = json.loads(parked.stdout.splitlines()[-1])
    assert up["state_before"] == "Active" and up["resident_pages_before"] == 0, up
    assert up["read_from"]["swap_file"] >= 32 << 20, up      # the written half, at least
    assert up["sent"] > 0 and up["checksums"] > 0
    resumed = _host("b", tmp_path, "resume", url, "--cache-dir", str(tmp_path / "b" / "c"))
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout.splitlines()[-1])
    assert out["ok"] is True, out["check"]
    assert out["handler"]["source_hash_failures"] == 0


def test_a_swapped_park_that_fails_leaves_the_vm_running(tmp_path: Path) -> None:
    """The store refuses every chunk after the monitor detached (its pool is a file, not a
    directory): the park is called off, a successor serves the VM where it was -- the guest
    then verifies every checksum -- and no manifest says there is a snapshot."""
    store = tmp_path / "store"      # a directory store: the snapshot's keys, its pool "chunks"
    store.mkdir()
    (store / "chunks").write_text("not a directory")
    url = str(store)
    failed = _host("a", tmp_path, "park", url, "--swapped", "--memory", "64", "--vcpus", "1",
                   "--regions", "1", "--swap-dir", str(tmp_path / "a"))
    assert failed.returncode == 1, failed.stdout
    assert "called off and the VM ran on" in failed.stderr, failed.stderr
    assert "checksums and 8 pattern fills verified by the guest" in failed.stderr, failed.stderr
    assert "resumed from state Active" in failed.stderr, failed.stderr   # the successor
    assert not (store / "manifest.json").exists()
