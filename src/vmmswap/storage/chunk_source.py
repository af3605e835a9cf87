"""ChunkSource: a snapshot's memory served from chunks in an object store, fetched on demand.

It is a :class:`~vmmswap.snapshot.source.MemorySource`, so the snapshot handler serves faults
from it exactly as from a local file. A read is cut into the chunks it overlaps; each is taken
from the on-disk :class:`~vmmswap.storage.cache.ChunkCache` or fetched (a whole-chunk GET) by a
pool of threads, several in flight, the missing chunks of one read all at once.

What keeps data safe:

* **Every chunk is verified** (SHA-256 against the manifest's key) before a byte of it is
  copied to the caller or enters the cache. A chunk that fails is counted (``hash_failures``),
  thrown away and fetched again.
* **The caller blocks; nothing is ever filled in.** A store that is down, slow, answers
  an error, or lacks a chunk the manifest names is retried with exponential backoff
  (``backoff_initial`` doubling to ``backoff_max``, with jitter), every retry counted, until it
  answers -- for ever unless ``give_up_after`` is set, in which case the read raises
  SourceError and the handler leaves the fault unanswered. The only zeros served are chunks
  the manifest records as zeros.
* ``prefetch`` queues whole chunks (the recorded working set) on a pool of their own so
  demand reads never queue behind them; a demand read that wants a chunk still waiting in the
  prefetch queue takes it over.

:meth:`stats` is the status: chunks and bytes fetched, cache hits, retries, store errors, hash
failures, reads blocked right now and the last error.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from vmmswap.snapshot.source import SourceError
from vmmswap.storage.cache import ChunkCache
from vmmswap.storage.manifest import ChunkPatch, Manifest, chunk_hash, load_manifest
from vmmswap.storage.patch import PatchError, apply_patch
from vmmswap.storage.store import ObjectMissing, ObjectStore, open_store

_log = logging.getLogger(__name__)

BACKOFF_INITIAL: Final = 0.05
BACKOFF_MAX: Final = 2.0
#: Threads fetching the working set in the background (demand reads have their own pool).
#: Measured (bench_store.py, SeaweedFS on loopback, 2 cores): 3 threads re-touched a 256 MiB
#: working set in 382-505 ms after a cold resume, 6 in 258-359 ms.
PREFETCH_WORKERS: Final = 6
#: The on-disk chunk cache's default bound.
DEFAULT_CACHE_BYTES: Final = 1 << 30


class _Mismatch(Exception):  # noqa: N818 -- a kind of answer, caught at once
    """A fetched object is not what the manifest says (counted, retried, never served)."""


class ChunkSource:
    def __init__(self, store: ObjectStore, manifest: Manifest, cache: ChunkCache | None, *,
                 workers: int = 8, prefetch_workers: int = PREFETCH_WORKERS,
                 backoff_initial: float = BACKOFF_INITIAL, backoff_max: float = BACKOFF_MAX,
                 give_up_after: float | None = None) -> None:
        self.store = store
        self.manifest = manifest
        self.cache = cache
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        starts: list[int] = []
        lengths: list[int] = []
        digests: list[str | None] = []
        #: Chunk index -> how it is stored as a patch (most chunks are whole: absent).
        self._patches: dict[int, ChunkPatch] = {}
        for region in manifest.regions:
            for i, digest in enumerate(region.chunks):
                start, length = region.chunk_span(i, manifest.chunk_size)
                patch = region.patch_of(i)
                if patch is not None:
                    self._patches[len(digests)] = patch
                starts.append(start)
                lengths.append(length)
                digests.append(digest)
        self._starts: npt.NDArray[np.int64] = np.array(starts, dtype=np.int64)
        self._lengths: npt.NDArray[np.int64] = np.array(lengths, dtype=np.int64)
        self._digests = digests
        self._size = manifest.size
        # Re-entrant: a demand read that takes over a queued prefetch cancels its future under
        # the lock, and Future.cancel() runs the done callback (_done, which takes the lock) in
        # the same thread, at once. A plain Lock deadlocked the handler there.
        self._lock = threading.RLock()
        self._inflight: dict[str, tuple[Future[bytes], bool]] = {}
        self._demand = ThreadPoolExecutor(workers, thread_name_prefix="chunk-get")
        self._background = ThreadPoolExecutor(prefetch_workers, thread_name_prefix="chunk-pre")
        self._closed = threading.Event()
        self._counters = {"reads": 0, "bytes_read": 0, "chunks_fetched": 0, "bytes_fetched": 0,
                          "cache_hits": 0, "zero_chunk_reads": 0, "retries": 0,
                          "store_errors": 0, "missing": 0, "hash_failures": 0,
                          "prefetch_queued": 0, "waiting": 0}
        self._last_error = ""
        self._owns_cache = False

    @classmethod
    def open(cls, url: str, *, cache_dir: str | os.PathLike[str] | None = None,
             cache_bytes: int = DEFAULT_CACHE_BYTES, **options: Any) -> ChunkSource:
        """The snapshot at ``url`` (``s3://bucket/prefix`` or a directory), through a chunk
        cache in ``cache_dir`` (none: every chunk is fetched each time it is read). The
        source owns the cache and closes it."""
        store, prefix = open_store(url)
        manifest = load_manifest(store, prefix)
        cache = ChunkCache(cache_dir, cache_bytes) if cache_dir is not None else None
        try:
            source = cls(store, manifest, cache, **options)
        except BaseException:
            if cache is not None:
                cache.close()
            raise
        source._owns_cache = True
        return source

    # --- MemorySource -----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, view: memoryview) -> None:
        if self._closed.is_set():
            raise SourceError("chunk source is closed")
        end = offset + len(view)
        if offset < 0 or end > self._size:
            raise SourceError(f"read {offset:#x}+{len(view):#x} outside the snapshot's "
                              f"{self._size:#x} bytes")
        if not len(view):
            return
        first = int(np.searchsorted(self._starts, offset, side="right")) - 1
        last = int(np.searchsorted(self._starts, end - 1, side="right")) - 1
        pending: list[tuple[int, int, int, Future[bytes]]] = []
        hits = zeros = 0
        for c in range(first, last + 1):
            cstart = int(self._starts[c])
            lo, hi = max(offset, cstart), min(end, cstart + int(self._lengths[c]))
            part = view[lo - offset:hi - offset]
            digest = self._digests[c]
            if digest is None:
                part[:] = bytes(len(part))   # recorded as zeros in the manifest
                zeros += 1
            elif self.cache is not None and self.cache.read(digest, lo - cstart, part):
                hits += 1
            else:
                pending.append((c, lo, hi, self._future(c, demand=True)))
        with self._lock:
            self._counters["reads"] += 1
            self._counters["bytes_read"] += len(view)
            self._counters["cache_hits"] += hits
            self._counters["zero_chunk_reads"] += zeros
            self._counters["waiting"] += bool(pending)
        try:
            for c, lo, hi, fut in pending:
                data = self._result(c, fut)
                cstart = int(self._starts[c])
                view[lo - offset:hi - offset] = data[lo - cstart:hi - cstart]
        finally:
            if pending:
                with self._lock:
                    self._counters["waiting"] -= 1

    def close(self) -> None:
        self._closed.set()
        self._background.shutdown(wait=True, cancel_futures=True)
        self._demand.shutdown(wait=True, cancel_futures=True)
        if self._owns_cache and self.cache is not None:
            self.cache.close()
            self._owns_cache = False

    def ready(self, offset: int, length: int) -> bool:
        """Whether a read of these bytes would not wait for the store: every chunk they
        overlap is all zeros or in the cache (the handler's prefetch asks before it reads).
        Without a cache nothing is ever ready ahead of a read, so True: reads then block."""
        if self.cache is None:
            return True
        end = min(offset + length, self._size)
        if offset >= end:
            return True
        first = int(np.searchsorted(self._starts, offset, side="right")) - 1
        last = int(np.searchsorted(self._starts, end - 1, side="right")) - 1
        cache = self.cache
        for c in range(first, last + 1):
            digest = self._digests[c]
            if digest is not None and digest not in cache:
                return False
        return True

    def readahead_span(self, offset: int, length: int, focus: int) -> tuple[int, int]:
        """The part ``[lo, hi)`` of a readahead run ``[offset, offset + length)`` worth reading
        with the fault at byte ``focus``: the chunk holding ``focus`` (the fault needs it)
        and, on either side, the neighbours up to the first one a read would have to fetch.

        Why: a chunk the run merely reaches into costs a whole GET for the few pages of its
        edge, and a guest touching 4 MiB at a time at random places stops right there -- the
        bench's working-set runs fetched one such chunk per run (1.28x the working set) and
        recorded its pages into the working set. A guest that does go on faults in the next
        chunk and waits for it then instead of now: the same wait. Without a cache every read
        fetches anyway, so the run is left whole (the next chunk fetched ahead)."""
        end = min(offset + length, self._size)
        if self.cache is None or offset >= end or not offset <= focus < end:
            return offset, end
        first = int(np.searchsorted(self._starts, offset, side="right")) - 1
        last = int(np.searchsorted(self._starts, end - 1, side="right")) - 1
        at = int(np.searchsorted(self._starts, focus, side="right")) - 1
        cache = self.cache

        def ready(c: int) -> bool:
            digest = self._digests[c]
            return digest is None or digest in cache

        lo_c = at
        while lo_c > first and ready(lo_c - 1):
            lo_c -= 1
        hi_c = at
        while hi_c < last and ready(hi_c + 1):
            hi_c += 1
        return (max(offset, int(self._starts[lo_c])),
                min(end, int(self._starts[hi_c] + self._lengths[hi_c])))

    # --- prefetch and status ----------------------------------------------------------------
    def prefetch(self, offsets: npt.NDArray[np.uint64] | npt.NDArray[np.int64]) -> int:
        """Queue the chunks holding these byte offsets (e.g. working-set pages * 4096) for
        fetching in the background, in file order; returns how many were queued."""
        arr = np.asarray(offsets, dtype=np.int64)
        arr = arr[(arr >= 0) & (arr < self._size)]
        chunks = np.unique(np.searchsorted(self._starts, arr, side="right") - 1)
        queued = 0
        for c in chunks.tolist():
            digest = self._digests[c]
            if digest is None or (self.cache is not None and digest in self.cache):
                continue
            self._future(c, demand=False)
            queued += 1
        with self._lock:
            self._counters["prefetch_queued"] += queued
        return queued

    def stats(self) -> dict[str, int | str]:
        with self._lock:
            out: dict[str, int | str] = dict(self._counters)
            out["last_error"] = self._last_error
        if self.cache is not None:
            out["cache_bytes"] = self.cache.bytes
            out["cache_evictions"] = self.cache.evictions
        return out

    def wait_prefetched(self, timeout: float | None = None) -> bool:
        """Wait until no background fetch is queued or running (benchmarks, tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                futs = [f for f, demand in self._inflight.values() if not demand]
            if not futs:
                return True
            for f in futs:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    f.result(timeout=left)
                except (CancelledError, SourceError):
                    pass
                except TimeoutError:
                    return False

    # --- fetching ---------------------------------------------------------------------------
    def _future(self, c: int, *, demand: bool) -> Future[bytes]:
        digest = self._digests[c]
        assert digest is not None
        with self._lock:
            known = self._inflight.get(digest)
            if known is not None:
                fut, was_demand = known
                if was_demand or not demand or not fut.cancel():
                    return fut   # already fetching (or about to): share it
            pool = self._demand if demand else self._background
            fut = pool.submit(self._fetch, c)
            self._inflight[digest] = (fut, demand)
        fut.add_done_callback(functools.partial(self._done, digest))
        return fut

    def _done(self, digest: str, fut: Future[bytes]) -> None:
        with self._lock:
            known = self._inflight.get(digest)
            if known is not None and known[0] is fut:
                del self._inflight[digest]

    def _result(self, c: int, fut: Future[bytes]) -> bytes:
        while True:
            try:
                return fut.result()
            except CancelledError:
                if self._closed.is_set():
                    raise SourceError("chunk source closed while a read waited") from None
                fut = self._future(c, demand=True)   # a prefetch handed over to demand

    @staticmethod
    def _verified(data: bytes, digest: str, length: int) -> bool:
        """The one check between the store and the caller (a test's control overrides it)."""
        return len(data) == length and chunk_hash(data) == digest

    def _get(self, digest: str, length: int) -> bytes:
        """One GET of the whole chunk ``digest``, verified; _Mismatch if it is not it."""
        key = self.manifest.chunk_key(digest)
        data = self.store.get(key)
        if not self._verified(data, digest, length):
            raise _Mismatch(f"chunk {digest[:16]}... from {self.store.url}/{key} failed its "
                            f"hash ({len(data)} bytes, expected {length}): not served")
        self._count_fetched(len(data))
        return data

    def _get_patched(self, digest: str, length: int, patch: ChunkPatch) -> bytes:
        """The chunk rebuilt from its root (the cache's copy, or a GET) and its patch, each
        verified, and the result verified against the chunk's own hash."""
        root = bytearray(length)
        if self.cache is None or not self.cache.read(patch.base, 0, memoryview(root)):
            root = bytearray(self._get(patch.base, length))
        key = self.manifest.chunk_key(patch.patch)
        data = self.store.get(key)
        if len(data) != patch.nbytes or chunk_hash(data) != patch.patch:
            raise _Mismatch(f"patch {patch.patch[:16]}... from {self.store.url}/{key} failed "
                            "its hash: not applied")
        self._count_fetched(len(data))
        try:
            chunk = apply_patch(root, data)
        except PatchError as err:
            raise _Mismatch(f"patch {patch.patch[:16]}...: {err}") from None
        if not self._verified(chunk, digest, length):
            raise _Mismatch(f"chunk {digest[:16]}... rebuilt from {patch.base[:16]}... and "
                            f"patch {patch.patch[:16]}... failed its hash: not served")
        return chunk

    def _count_fetched(self, nbytes: int) -> None:
        with self._lock:
            self._counters["bytes_fetched"] += nbytes

    def _fetch(self, c: int) -> bytes:
        """GET chunk ``c`` until it arrives whole and verified (or the source gives up)."""
        digest = self._digests[c]
        assert digest is not None
        length = int(self._lengths[c])
        patch = self._patches.get(c)
        delay = self.backoff_initial
        started = time.monotonic()
        while True:
            if self._closed.is_set():
                raise SourceError("chunk source is closed")
            problem = "store_errors"
            try:
                data = (self._get(digest, length) if patch is None
                        else self._get_patched(digest, length, patch))
            except ObjectMissing as err:
                problem, message = "missing", str(err)
            except _Mismatch as err:
                problem, message = "hash_failures", str(err)
            except OSError as err:
                message = str(err)
            else:
                if self.cache is not None:
                    self.cache.insert(digest, data)
                with self._lock:
                    self._counters["chunks_fetched"] += 1
                return data
            with self._lock:
                self._counters[problem] += 1
                self._counters["retries"] += 1
                self._last_error = message
            _log.warning("%s; retrying in %.2f s", message, delay)
            if self.give_up_after is not None and (
                    time.monotonic() - started + delay > self.give_up_after):
                raise SourceError(f"gave up on chunk {digest[:16]}... after "
                                  f"{time.monotonic() - started:.1f} s: {message}")
            if self._closed.wait(delay * random.uniform(0.5, 1.0)):
                raise SourceError("chunk source is closed")
            delay = min(delay * 2, self.backoff_max)
