"""A model of the VT100 screen memtest86+ draws on its serial console.

memtest never prints lines: it positions the cursor (``ESC [ row ; col H``) and overwrites
fields in place, so its output means nothing until replayed onto a character grid. This is a
pure parser of the raw bytes into that grid, implementing only what memtest sends (cursor
positioning, erase, attributes ignored, CR/LF/BS); unknown escape sequences are consumed and
ignored so that one never shifts the text after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROWS = 24
COLS = 80
_ESC = 0x1B


class Screen:
    """``rows`` x ``cols`` characters: :meth:`feed` raw bytes, read :meth:`row` or :meth:`text`."""

    def __init__(self, rows: int = ROWS, cols: int = COLS) -> None:
        self.rows = rows
        self.cols = cols
        self._grid = [[" "] * cols for _ in range(rows)]
        self.row_pos = 0
        self.col_pos = 0
        self._pending = bytearray()

    def feed(self, data: bytes) -> None:
        """Apply ``data``; an escape sequence cut at the end is kept for the next call."""
        buf = bytes(self._pending) + data
        self._pending.clear()
        i = 0
        n = len(buf)
        while i < n:
            byte = buf[i]
            if byte == _ESC:
                end = self._escape_end(buf, i)
                if end is None:
                    self._pending += buf[i:]
                    return
                self._escape(buf[i:end])
                i = end
                continue
            self._char(byte)
            i += 1

    @staticmethod
    def _escape_end(buf: bytes, start: int) -> int | None:
        """The index after the escape sequence at ``start``, or None if it is incomplete."""
        if start + 1 >= len(buf):
            return None
        if buf[start + 1] != ord("["):
            return start + 2  # a two-byte escape (ESC c, ESC 7, ...)
        i = start + 2
        while i < len(buf):
            if 0x40 <= buf[i] <= 0x7E:
                return i + 1
            i += 1
        return None

    def _escape(self, seq: bytes) -> None:
        if len(seq) < 3 or seq[1] != ord("["):
            if seq[1:2] == b"c":
                self._clear_all()
            return
        final = chr(seq[-1])
        body = seq[2:-1].decode("ascii", "replace")
        if body.startswith("?"):
            return  # private modes (cursor visibility)
        args = [int(p) if p.isdigit() else 0 for p in body.split(";")] if body else []
        if final in "Hf":
            row = args[0] if args and args[0] else 1
            col = args[1] if len(args) > 1 and args[1] else 1
            self.row_pos = min(max(row - 1, 0), self.rows - 1)
            self.col_pos = min(max(col - 1, 0), self.cols - 1)
        elif final == "J":
            mode = args[0] if args else 0
            if mode == 2:
                self._clear_all()
            elif mode == 0:
                self._erase_line(self.row_pos, self.col_pos, self.cols)
                for r in range(self.row_pos + 1, self.rows):
                    self._erase_line(r, 0, self.cols)
        elif final == "K":
            mode = args[0] if args else 0
            start, end = {0: (self.col_pos, self.cols), 1: (0, self.col_pos + 1)}.get(
                mode, (0, self.cols))
            self._erase_line(self.row_pos, start, end)
        elif final in "ABCD":
            count = args[0] if args and args[0] else 1
            if final == "A":
                self.row_pos = max(self.row_pos - count, 0)
            elif final == "B":
                self.row_pos = min(self.row_pos + count, self.rows - 1)
            elif final == "C":
                self.col_pos = min(self.col_pos + count, self.cols - 1)
            else:
                self.col_pos = max(self.col_pos - count, 0)
        # "m" (attributes) and anything else: no effect on the characters.

    def _char(self, byte: int) -> None:
        if byte == 0x0D:
            self.col_pos = 0
        elif byte == 0x0A:
            self.row_pos = min(self.row_pos + 1, self.rows - 1)
        elif byte == 0x08:
            self.col_pos = max(self.col_pos - 1, 0)
        elif byte >= 0x20:
            if self.col_pos < self.cols:
                self._grid[self.row_pos][self.col_pos] = chr(byte) if byte < 0x7F else "?"
            self.col_pos = min(self.col_pos + 1, self.cols)

    def _erase_line(self, row: int, start: int, end: int) -> None:
        for c in range(start, min(end, self.cols)):
            self._grid[row][c] = " "

    def _clear_all(self) -> None:
        for r in range(self.rows):
            self._erase_line(r, 0, self.cols)

    def row(self, index: int) -> str:
        return "".join(self._grid[index])

    def text(self) -> str:
        return "\n".join(self.row(r).rstrip() for r in range(self.rows))

    def field(self, row: int, col: int) -> str:
        """The whitespace-delimited word starting at or around (``row``, ``col``), 0-based."""
        line = self.row(row)
        start = col
        while start > 0 and line[start - 1] != " ":
            start -= 1
        end = col
        while end < len(line) and line[end] != " ":
            end += 1
        return line[start:end]


@dataclass(frozen=True)
class MemtestStatus:
    """memtest's own counters as its status line shows them."""

    passes: int
    errors: int
    test: str


#: The status row (0-based) holding "Pass: N  Errors: N" on the right of the "Using:" field.
STATUS_ROW = 8
#: The row naming the running test ("Test #5  [Moving inversions, random pattern]").
TEST_ROW = 3
_STATUS_RE = re.compile(r"Pass:\s*(\d+)\s+Errors:\s*(\d+)")
_TEST_RE = re.compile(r"Test #\s*(\d+)")


def read_status(screen: Screen) -> MemtestStatus | None:
    """The pass and error counts on ``screen``, or None before memtest drew its status line."""
    if screen.rows <= STATUS_ROW:
        return None
    match = _STATUS_RE.search(screen.row(STATUS_ROW))
    if match is None:
        return None
    test = _TEST_RE.search(screen.row(TEST_ROW))
    return MemtestStatus(int(match.group(1)), int(match.group(2)),
                         test.group(1) if test else "")
