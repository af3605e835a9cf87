"""A bounded on-disk cache of chunks, least recently used out first.

Resuming a VM touches the same chunks again and again (every 4 KiB fault inside a 1 MiB chunk);
the store is asked for each chunk once, after which faults are served from a local file. The
cache is a directory of files named by the chunk's hash, with an in-memory LRU index of their
sizes; inserting past ``max_bytes`` deletes the least recently used files.

Trust: a chunk enters the cache only after its hash was verified. A file found in the directory
at start (a previous process's cache, which may be stale or damaged) is verified again the
first time it is read, and dropped if it fails. One process owns a cache directory at a time
(an flock on ``.lock``): two processes evicting each other's files would only cost refetches,
but would make the size bound meaningless.

Correctness never depends on the cache keeping anything: a reader that misses fetches again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

from vmmswap.storage.manifest import chunk_hash

_NAME_LEN = 64


class CacheBusy(OSError):  # noqa: N818
    """Another process owns this cache directory."""


class ChunkCache:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("a cache needs a positive size limit")
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(self.dir, follow_symlinks=False)
        # Guest memory lives here, and a chunk read back from a file this process already
        # checked is not hashed again: nobody else may read or replace one.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(f"{self.dir}: a chunk cache must be a directory of ours "
                                  f"with mode 0700 (it is {stat.S_IMODE(st.st_mode):o}, "
                                  f"uid {st.st_uid})")
        self.max_bytes = max_bytes
        self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise CacheBusy(f"{self.dir}: chunk cache in use by another process") from None
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()
        self._verified: set[str] = set()
        self.bytes = 0
        self.evictions = 0
        self.dropped = 0   # files that failed their hash when read back
        found = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    if entry.name != ".lock":
                        os.unlink(entry.path)   # a write that never finished
                continue
            if len(entry.name) == _NAME_LEN and entry.is_file():
                st = entry.stat()
                found.append((st.st_mtime, entry.name, st.st_size))
        for _mtime, name, size in sorted(found):
            self._index[name] = size
            self.bytes += size
        with self._lock:
            self._evict(keep=None)

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._index

    def __len__(self) -> int:
        return len(self._index)

    def read(self, digest: str, start: int, view: memoryview) -> bool:
        """Fill ``view`` from ``start`` in the chunk; False when it is not (or no longer) here."""
        path = self.dir / digest
        with self._lock:
            if digest not in self._index:
                return False
            self._index.move_to_end(digest)
            verified = digest in self._verified
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._forget(digest)
                return False
        try:
            if not verified:
                data = os.pread(fd, self._index.get(digest, 0) or os.fstat(fd).st_size, 0)
                if chunk_hash(data) != digest:
                    with self._lock:
                        self.dropped += 1
                        self._forget(digest)
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    return False
                with self._lock:
                    self._verified.add(digest)
                if start + len(view) > len(data):
                    return False
                view[:] = data[start:start + len(view)]
                return True
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    return False
                done += got
            return True
        finally:
            os.close(fd)

    def insert(self, digest: str, data: bytes | bytearray | memoryview) -> None:
        """Add a chunk whose hash the caller verified; evicts the oldest past the limit."""
        if len(data) > self.max_bytes:
            return
        path = self.dir / digest
        tmp = self.dir / f".{digest}.{threading.get_ident():x}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return   # a full disk costs refetches, never data
        with self._lock:
            if digest in self._index:
                self.bytes -= self._index[digest]
            self._index[digest] = len(data)
            self._index.move_to_end(digest)
            self._verified.add(digest)
            self.bytes += len(data)
            self._evict(keep=digest)

    def _forget(self, digest: str) -> None:
        size = self._index.pop(digest, None)
        if size is not None:
            self.bytes -= size
        self._verified.discard(digest)

    def _evict(self, keep: str | None) -> None:
        while self.bytes > self.max_bytes and self._index:
            oldest = next(iter(self._index))
            if oldest == keep:
                break
            self._forget(oldest)
            self.evictions += 1
            with contextlib.suppress(OSError):
                os.unlink(self.dir / oldest)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
