"""Adaptive readahead for the fault path: which neighbours to fill on one fault.

crosvm serves exactly one 4 KiB page per fault. A fault costs ~10 us on the faulting CPU and
~55 us when the handler runs on the other CPU (the cross-CPU wake-up dominates, not the copy),
while one UFFDIO_COPY of 2 MiB moves data at ~4 GB/s. Filling the neighbours of a fault in the
same ioctl therefore turns a sequential page-in from hundreds of thousands of round trips into
a few hundred -- if, and only if, the guest really walks through those pages. Filling pages it
never touches costs a copy and, worse, memory the guest had given up.

So the window follows the access pattern, like the kernel's file readahead:

* Faults are grouped into *streams*; a stream remembers the extent ``[lo, hi)`` its fills
  covered and its window. A fault just above the extent (``hi <= page < hi + window``)
  continues it upwards, a fault just below (``lo - window <= page < lo``) continues it
  downwards: the window doubles, up to the cap, and the pages the stream filled ahead last time
  count as faults avoided (the guest walked through them). The tolerance of one window matters:
  ``memcpy`` touches the *tail* of a big copy before its body, and glibc's ``memmove`` copies
  *backwards* whenever the destination lies above the source, so a reader that copies guest
  memory chunk by chunk faults "head, tail, tail-1, tail-2, ..., then the next head". Tracking
  both directions over one extent lets the head of the next chunk continue the stream upwards
  with the window the descending part grew.
* When several streams match, the one with the largest window wins. Any other fault starts a
  new stream with the minimum window (one page: exactly crosvm's cost for random access); the
  least recently used stream is forgotten, so a few interleaved readers keep their windows
  while random faults stay cheap.

The window is only an upper bound: the handler fills the run of pages that sit in the same
source as the faulting page (see :mod:`vmmswap.dataplane.page_handler`), never a page the source
does not
hold, and never across a region boundary.
"""

from __future__ import annotations

from typing import Final

#: Streams remembered at once.
DEFAULT_STREAMS: Final = 4

UP: Final = 1
DOWN: Final = -1


class Readahead:
    """Per-handler readahead state (a handful of integers, no per-page memory)."""

    __slots__ = ("_avoided", "_matched", "_max_pages", "_min_pages", "_streams", "_width")

    def __init__(self, max_pages: int, *, min_pages: int = 1,
                 streams: int = DEFAULT_STREAMS) -> None:
        if not 1 <= min_pages <= max_pages:
            raise ValueError(f"readahead needs 1 <= min_pages ({min_pages}) <= max_pages "
                             f"({max_pages})")
        if streams < 1:
            raise ValueError("readahead needs at least one stream")
        self._max_pages = max_pages
        self._min_pages = min_pages
        self._width = streams
        #: Streams, most recently used first: [lo, hi, window, ahead], where ``ahead`` counts
        #: the pages the stream's last fill put beside its faulting page.
        self._streams: list[list[int]] = []
        self._matched: list[int] | None = None
        self._avoided = 0

    @property
    def max_pages(self) -> int:
        return self._max_pages

    @property
    def faults_avoided(self) -> int:
        """Pages filled ahead that the guest then walked through without faulting."""
        return self._avoided

    def reset(self) -> None:
        """Forget every stream and the counter (a new ``enable``)."""
        self._streams.clear()
        self._matched = None
        self._avoided = 0

    def window(self, page: int) -> tuple[int, int]:
        """``(pages, direction)`` to try to fill for a fault at ``page``.

        ``direction`` UP means ``[page, page + pages)``, DOWN means ``(page - pages, page]``.
        Call :meth:`record` with what was filled.
        """
        match: list[int] | None = None
        best, direction = 0, UP
        for stream in self._streams:
            lo, hi, window, _ahead = stream
            if window <= best:
                continue
            if hi <= page < hi + window:
                match, best, direction = stream, window, UP
            elif lo - window <= page < lo:
                match, best, direction = stream, window, DOWN
        self._matched = match
        if match is None:
            return self._min_pages, UP
        self._avoided += match[3]
        return min(best * 2, self._max_pages), direction

    def record(self, first: int, end: int, window: int) -> None:
        """Pages ``[first, end)`` were filled for a fault whose window was ``window``."""
        end = max(end, first + 1)
        streams = self._streams
        stream = self._matched
        self._matched = None
        if stream is not None:
            stream[0] = min(stream[0], first)
            stream[1] = max(stream[1], end)
            stream[2] = window
            stream[3] = end - first - 1
            if streams[0] is not stream:
                streams.remove(stream)
                streams.insert(0, stream)
            return
        if len(streams) >= self._width:
            streams.pop()
        streams.insert(0, [first, end, window, end - first - 1])
