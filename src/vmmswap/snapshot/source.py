"""Where a snapshot's memory bytes come from: the seam between the handler and its storage.

The handler (:mod:`vmmswap.snapshot.server`) asks for byte ranges of the *memory file* -- guest
memory region after region, Firecracker's layout -- and never cares whether they come from a
local file, a base snapshot with a diff overlaid on it, or chunks fetched from an object store.
Each of those is a :class:`MemorySource`.

The contract that keeps data safe: :meth:`MemorySource.read_into` fills the *whole* view with the
snapshot's bytes or raises. It never returns short, and never fills a range it could not read
with zeros: a source that cannot get a byte (a store unreachable, a chunk failing its hash)
blocks or raises, and the handler leaves the fault unanswered.
"""

from __future__ import annotations

import os
from typing import Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

_PAGE: Final = 4096


class SourceError(OSError):
    """The source cannot provide the bytes asked for; nothing was served from them."""


@runtime_checkable
class MemorySource(Protocol):
    """A read-only view of a snapshot's memory file."""

    @property
    def size(self) -> int:
        """Bytes in the memory file (the handshake's regions must lie inside)."""
        ...

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill all of ``view`` with the bytes at ``offset``, or raise (SourceError/OSError)."""
        ...

    def close(self) -> None:
        """Release what the source holds; reads after close are an error."""
        ...


class FileSource:
    """A memory file on a local file system, read with ``preadv`` (holes read as zeros)."""

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self._fd = fd
        self._owned = owned
        self._size = os.fstat(fd).st_size

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FileSource:
        return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), owned=True)

    @property
    def size(self) -> int:
        return self._size

    def fileno(self) -> int:
        return self._fd

    def read_into(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise SourceError(f"memory file short read at {offset + done:#x}: "
                                  f"{done} of {len(view)} bytes (the file ends at "
                                  f"{self._size:#x})")
            done += got

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class OverlaySource:
    """A base memory file with a diff laid over it: the pages listed in ``pages`` (a bool
    bitmap, one slot per 4 KiB page of the memory file) come from ``diff``, all others from
    ``base``. Both must be the same size -- a diff snapshot is a full-size sparse memory file
    in Firecracker's layout -- and the bitmap must cover them, so a page can never be served
    from the wrong layer. A listed page that is a hole in the diff reads as zeros: it was
    written with zeros, or given back, after the base was taken."""

    def __init__(self, base: MemorySource, diff: MemorySource, pages: npt.NDArray[np.bool_]
                 ) -> None:
        if base.size != diff.size:
            raise SourceError(f"the diff is {diff.size} bytes, its base {base.size}: a diff "
                              "snapshot must be a full-size memory file")
        if pages.ndim != 1 or len(pages) != -(-base.size // _PAGE):
            raise SourceError(f"the diff's page map has {len(pages)} pages, the memory file "
                              f"{-(-base.size // _PAGE)}")
        self._base = base
        self._diff = diff
        self._pages = pages

    @property
    def size(self) -> int:
        return self._base.size

    def read_into(self, offset: int, view: memoryview) -> None:
        if offset % _PAGE or len(view) % _PAGE:
            raise SourceError(f"overlay reads are whole pages, got {offset:#x}+{len(view):#x}")
        first = offset // _PAGE
        marks = self._pages[first:first + len(view) // _PAGE]
        # Runs of pages from the same layer, read with one call each.
        edges = np.flatnonzero(np.diff(marks.astype(np.int8))) + 1
        start = 0
        for end in [*edges.tolist(), len(marks)]:
            layer = self._diff if marks[start] else self._base
            layer.read_into(offset + start * _PAGE, view[start * _PAGE:end * _PAGE])
            start = end

    # A base in an object store keeps its prefetch, readiness and counters visible through
    # the overlay (the diff is a local file: always ready, nothing to count).
    def prefetch(self, offsets: npt.NDArray[np.uint64]) -> int:
        fn = getattr(self._base, "prefetch", None)
        return int(fn(offsets)) if callable(fn) else 0

    def ready(self, offset: int, length: int) -> bool:
        fn = getattr(self._base, "ready", None)
        return bool(fn(offset, length)) if callable(fn) else True

    def readahead_span(self, offset: int, length: int, focus: int) -> tuple[int, int]:
        fn = getattr(self._base, "readahead_span", None)
        if not callable(fn):
            return offset, offset + length
        lo, hi = fn(offset, length, focus)
        return int(lo), int(hi)

    def stats(self) -> dict[str, int | str]:
        fn = getattr(self._base, "stats", None)
        return dict(fn()) if callable(fn) else {}

    def close(self) -> None:
        self._base.close()
        self._diff.close()
