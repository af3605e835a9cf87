"""Uploading a memory file as content-addressed chunks: parallel, resumable, diff-aware.

Each chunk is read, tested for zeros (a zero chunk is a ``null`` in the manifest, never
stored), hashed, and PUT under its hash -- unless the pool already has it. The pool is listed
once at the start, so

* an upload that was interrupted resumes where it stopped (its chunks are already there);
* a second snapshot of the same guest sends only the chunks that changed (the others hash to
  keys already present);
* given the previous snapshot's manifest and a bitmap of the 4 KiB pages written since, a
  *diff* upload does not even read the chunks no written page touches: it reuses their hashes.

Chunks go up from a pool of threads (pread, SHA-256 and the PUT all release the GIL), at most
``2 * workers`` chunks in memory at once. Holes of a sparse memory file (SEEK_DATA/SEEK_HOLE)
are zeros without being read. The manifest goes up last (see :mod:`.manifest`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vmmswap.storage.manifest import (
    DEFAULT_CHUNK_SIZE,
    ChunkedRegion,
    ChunkPatch,
    Manifest,
    chunk_hash,
    default_pool,
    file_key,
    save_manifest,
)
from vmmswap.storage.patch import encode_patch, page_map_hex, parse_page_map
from vmmswap.storage.store import ObjectStore, join


class Readable(Protocol):
    """What an upload reads from: a MemorySource (``FileSource``, an overlay) or alike."""

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, view: memoryview) -> None: ...


#: One chunk of the manifest: its hash (None: zeros) and, if stored as one, its patch.
Entry = tuple[str | None, ChunkPatch | None]


@dataclass(slots=True)
class UploadStats:
    chunks: int = 0          # chunks in the manifest, zero ones included
    zero_chunks: int = 0     # all zeros: not stored
    sent: int = 0            # PUT by this upload
    present: int = 0         # already in the pool (an earlier snapshot, an interrupted upload)
    reused: int = 0          # a diff: not read, the base's hash kept
    patched: int = 0         # a diff: stored as a patch over the base's whole chunk
    bytes_sent: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` extents of a file holding data (the rest are holes: zeros)."""
    extents = []
    at = 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:
            break   # ENXIO: no data after ``at``
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size)))
        at = end
    return extents


class _Holes:
    """Whether a byte range is all hole, from the file's data extents (no reads)."""

    def __init__(self, source: Readable) -> None:
        fileno = getattr(source, "fileno", None)
        self._extents: list[tuple[int, int]] | None = None
        if callable(fileno):
            with contextlib.suppress(OSError):
                self._extents = _data_extents(int(fileno()), source.size)

    def is_hole(self, start: int, length: int) -> bool:
        if self._extents is None:
            return False
        end = start + length
        return not any(s < end and start < e for s, e in self._extents)


def _chunk_has_written_page(changed: npt.NDArray[np.bool_], start: int, length: int) -> bool:
    return bool(changed[start // 4096:-(-(start + length) // 4096)].any())


def upload_memory(store: ObjectStore, prefix: str, source: Readable, *,
                  regions: Sequence[tuple[int, int]] | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, pool: str | None = None,
                  workers: int = 8, base: Manifest | None = None,
                  changed: npt.NDArray[np.bool_] | None = None,
                  files: Mapping[str, bytes] | None = None, parent: str | None = None,
                  ) -> tuple[Manifest, UploadStats]:
    """Upload ``source`` (the memory file) as the snapshot at ``prefix``; the manifest last.

    ``regions`` are ``(offset, size)`` back to back (default: the whole file, one region).
    ``base`` + ``changed`` (a bool per 4 KiB page of the file, True = written since ``base``)
    make a diff upload; ``base`` must have the same regions and chunk size. ``files`` are
    small files stored beside the manifest (the VM state). Raises StoreError when the store
    fails; what went up is then reused by the next attempt.
    """
    if chunk_size <= 0 or chunk_size % 4096:
        raise ValueError(f"chunk size {chunk_size} is not a positive multiple of 4 KiB")
    t0 = time.monotonic()
    spans = list(regions) if regions is not None else [(0, source.size)]
    if sum(s for _, s in spans) != source.size or any(
            off != sum(s for _, s in spans[:i]) for i, (off, _) in enumerate(spans)):
        raise ValueError(f"regions {spans} are not the memory file's {source.size} bytes "
                         "back to back")
    pool = pool if pool is not None else default_pool(prefix)
    if base is not None:
        if base.chunk_size != chunk_size or [(r.offset, r.size) for r in base.regions] != spans:
            raise ValueError("a diff needs the base's regions and chunk size")
        if base.pool != pool:
            raise ValueError(f"a diff reuses its base's chunks: its pool must be the base's "
                             f"({base.pool!r}, not {pool!r})")
        if changed is None or len(changed) * 4096 < source.size:
            raise ValueError("a diff needs a written-page bitmap covering the memory file")
    stats = UploadStats()
    present = {key.rpartition("/")[2] for key, _ in store.list(pool + "/")}
    lock = threading.Lock()
    holes = _Holes(source)
    local = threading.local()

    def one(region_index: int, index: int) -> Entry:
        offset, size = spans[region_index]
        start = index * chunk_size
        length = min(chunk_size, size - start)
        if base is not None and changed is not None and not _chunk_has_written_page(
                changed, offset + start, length):
            with lock:
                stats.reused += 1
            region = base.regions[region_index]
            return region.chunks[index], region.patch_of(index)
        if holes.is_hole(offset + start, length):
            with lock:
                stats.zero_chunks += 1
            return None, None
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(chunk_size)
        view = memoryview(buf)[:length]
        source.read_into(offset + start, view)
        if not np.frombuffer(view, dtype=np.uint64).any():
            with lock:
                stats.zero_chunks += 1
                stats.bytes_read += length
            return None, None
        digest = chunk_hash(view)
        with lock:
            stats.bytes_read += length
            known = digest in present
        if known:
            with lock:
                stats.present += 1
            return digest, None
        if base is not None and changed is not None:
            patch = _as_patch(base.regions[region_index], index, view,
                              changed[(offset + start) // 4096:(offset + start + length) // 4096])
            if patch is not None:
                entry, data = patch
                with lock:
                    known = entry.patch in present
                if not known:
                    store.put(join(pool, entry.patch), data)
                with lock:
                    present.add(entry.patch)
                    stats.patched += 1
                    if not known:
                        stats.bytes_sent += len(data)
                return digest, entry
        store.put(join(pool, digest), view)
        with lock:
            present.add(digest)
            stats.sent += 1
            stats.bytes_sent += length
        return digest, None

    def jobs() -> Iterator[tuple[int, int]]:
        for ri, (_off, size) in enumerate(spans):
            for ci in range(-(-size // chunk_size)):
                yield ri, ci

    digests: dict[tuple[int, int], Entry] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload") as ex:
        inflight: dict[Future[Entry], tuple[int, int]] = {}
        try:
            for job in jobs():
                while len(inflight) >= 2 * workers:
                    _collect(inflight, digests)
                inflight[ex.submit(one, *job)] = job
            while inflight:
                _collect(inflight, digests)
        except BaseException:
            for fut in inflight:
                fut.cancel()
            raise
    chunked = []
    for ri, (off, size) in enumerate(spans):
        entries = [digests[(ri, ci)] for ci in range(-(-size // chunk_size))]
        patches = tuple(p for _, p in entries)
        chunked.append(ChunkedRegion(off, size, tuple(d for d, _ in entries),
                                     patches if any(p is not None for p in patches) else ()))
    stats.chunks = sum(len(r.chunks) for r in chunked)
    stored: dict[str, str] = {}
    for name, data in (files or {}).items():
        key = file_key(prefix, name, data)
        store.put(key, data)
        stored[name] = key
    manifest = Manifest(chunk_size, tuple(chunked), pool, stored, parent)
    save_manifest(store, prefix, manifest)   # last: only now is it a snapshot
    stats.seconds = time.monotonic() - t0
    return manifest, stats


def _as_patch(base: ChunkedRegion, index: int, chunk: memoryview,
              written: npt.NDArray[np.bool_]) -> tuple[ChunkPatch, bytes] | None:
    """Chunk ``index`` (new bytes ``chunk``, ``written`` its pages written since ``base``) as
    a patch over the whole chunk the base's content rests on, or None when it is better stored
    whole (no whole chunk underneath, or more than half of its pages differ from it).

    The patch carries every page that may differ from that root: the pages written since the
    base, and those the base's own patch carried (their new bytes are in ``chunk`` too)."""
    old = base.patch_of(index)
    root = old.base if old is not None else base.chunks[index]
    if root is None:
        return None
    pages = np.array(written, dtype=np.bool_)
    if old is not None:
        pages |= parse_page_map(old.pages, len(pages))
    if int(np.count_nonzero(pages)) * 2 > len(pages):
        return None
    data = encode_patch(chunk, pages)
    return ChunkPatch(root, chunk_hash(data), page_map_hex(pages), len(data)), data


def _collect(inflight: dict[Future[Entry], tuple[int, int]],
             digests: dict[tuple[int, int], Entry]) -> None:
    done, _ = wait(inflight, return_when=FIRST_COMPLETED)
    for fut in done:
        job = inflight.pop(fut)
        digests[job] = fut.result()   # a failed chunk raises here: no manifest is written
