"""An object store with failures injected in front of a real one, for the storage tests.

``FaultyStore(inner, get_delay=S)`` makes every GET take S seconds longer (a slow link: the
prefetch queue backs up); ``get_fails`` / ``put_fails`` (predicates of the key) make a GET or a
PUT raise StoreUnavailable whenever they are true (the store down, the link dropped).
:func:`after_puts` is the predicate of a link that drops after N PUTs. Every other operation
goes straight to ``inner``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmmswap.storage.store import ObjectStore, StoreUnavailable


class FaultyStore:
    def __init__(self, inner: ObjectStore, *, get_delay: float = 0.0,
                 get_fails: Callable[[str], bool] | None = None,
                 put_fails: Callable[[str], bool] | None = None) -> None:
        self.inner = inner
        self.get_delay = get_delay
        self.get_fails = get_fails
        self.put_fails = put_fails

    @property
    def url(self) -> str:
        return self.inner.url

    def get(self, key: str) -> bytes:
        if self.get_delay:
            time.sleep(self.get_delay)
        if self.get_fails is not None and self.get_fails(key):
            raise StoreUnavailable("injected: connection refused")
        return self.inner.get(key)

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        if self.put_fails is not None and self.put_fails(key):
            raise StoreUnavailable("injected: connection reset")
        self.inner.put(key, data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def after_puts(puts: int) -> Callable[[str], bool]:
    """A ``put_fails`` predicate: the first ``puts`` PUTs work, every later one fails."""
    left = puts

    def fails(_key: str) -> bool:
        nonlocal left
        if left <= 0:
            return True
        left -= 1
        return False

    return fails
