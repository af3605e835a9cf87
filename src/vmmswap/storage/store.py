"""The object-store core: a small protocol, its errors, and a local-directory backend.

Everything above this module (uploads, the chunk source) speaks only :class:`ObjectStore`,
so the S3 backend and the directory backend the unit tests use are interchangeable. Keys are
``/``-separated relative paths; a store is rooted at a bucket and prefix of its own.

Errors are split by what the caller should do about them:

* :class:`ObjectMissing` -- the key is not there (a definite answer: never retried);
* :class:`StoreUnavailable` -- anything else (refused connection, timeout, 5xx, a local I/O
  error): the caller may retry later. A reader of snapshot memory blocks and retries; it never
  takes an unavailable store for missing data.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


class StoreError(OSError):
    """Base of the store's errors."""


class ObjectMissing(StoreError):  # noqa: N818 -- it is a state, not a failure
    """The object does not exist (definite: retrying will not make it appear)."""


class StoreUnavailable(StoreError):  # noqa: N818
    """The store could not answer (network, timeout, server error): retry later."""


@runtime_checkable
class ObjectStore(Protocol):
    """What the store tier needs of an object store."""

    @property
    def url(self) -> str:
        """Where this store is (``s3://bucket/prefix`` or ``file:///dir``), for messages."""
        ...

    def put(self, key: str, data: Buffer) -> None:
        """Store ``data`` under ``key`` atomically (a reader sees all of it or nothing)."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer only at the object's end)."""
        ...

    def head(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        ...

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(key, size)`` of every object whose key starts with ``prefix``."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object (missing is not an error)."""
        ...


def join(*parts: str) -> str:
    """Keys joined with single slashes, empty parts dropped."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class LocalStore:
    """An object store in a local directory: one file per key, written by rename.

    For unit tests and for a store on a shared file system. ``put`` writes a temporary file
    beside the target and renames it over, so a reader never sees half an object.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad object key {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: Buffer) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{id(data):x}")
            # Guest memory: readable by its owner only (0600 whatever the umask allows).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as err:
            raise StoreUnavailable(f"{self.url}: cannot put {key}: {err}") from err

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url}: no object {key}") from None
        except OSError as err:
            raise StoreUnavailable(f"{self.url}: cannot get {key}: {err}") from err

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return os.pread(f.fileno(), length, start)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url}: no object {key}") from None
        except OSError as err:
            raise StoreUnavailable(f"{self.url}: cannot get {key}: {err}") from err

    def head(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StoreUnavailable(f"{self.url}: cannot head {key}: {err}") from err

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self.root
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith("."):
                    continue   # a put in progress
                path = Path(dirpath, name)
                key = path.relative_to(base).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        yield key, path.stat().st_size

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


def open_store(url: str) -> tuple[ObjectStore, str]:
    """The store and key prefix a URL names: ``s3://bucket/prefix``, or ``file:///dir`` or a
    plain directory path (the store is then the directory, the prefix empty)."""
    if url.startswith("s3://"):
        s3 = importlib.import_module("vmmswap.storage.s3")   # the optional extra: on use only
        bucket, prefix = s3.split_s3_url(url)
        store: ObjectStore = s3.S3ObjectStore.from_environment(bucket)
        return store, prefix
    if url.startswith("file://"):
        return LocalStore(url.removeprefix("file://")), ""
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r} (s3://bucket/prefix or a directory)")
    return LocalStore(url), ""
