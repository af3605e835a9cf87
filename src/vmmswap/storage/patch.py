"""Patch objects: a chunk stored as the pages that differ from a whole chunk already stored.

Content addressing dedups whole chunks: a guest that rewrites 10 % of its pages at random
touches almost every 1 MiB chunk (1 - 0.9^256 of them), and each changed chunk would be stored
again whole -- 2x the bytes for a tenth of the pages. A diff upload that knows which pages were
written (dirty tracking, ``upload_memory(base=, changed=)``) stores such a chunk as a *patch*
over the chunk its base snapshot had: the written pages' bytes and which pages they are.

A patch always applies to a *whole* chunk (the root), never to another patch: a chunk patched
in one snapshot and written again in the next gets one new patch over the same root, carrying
the pages of both (the uploader has every page's new bytes; the manifest has the old patch's
page map). So a read is at most two objects, however long the chain of snapshots.

Layout (little-endian)::

    0   4s   magic b"VMPT"
    4   u16  version (1)
    6   u16  0
    8   u32  chunk length in bytes (a multiple of 4096)
    12  u32  pages carried
    16       page map: one bit per 4 KiB page of the chunk, LSB first, ceil(pages / 8) bytes
    ...      the carried pages, 4096 bytes each, in page order

What a patch object claims is checked when it is parsed, and the chunk it rebuilds is checked
against the chunk's own SHA-256 by the reader (:mod:`.chunk_source`): a patch that is corrupt,
or built from a page map that missed a written page, is never served.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["PatchError", "apply_patch", "encode_patch", "page_map_hex", "parse_page_map",
           "patch_bytes"]

MAGIC: Final = b"VMPT"
VERSION: Final = 1
_HEADER: Final = struct.Struct("<4sHHII")
PAGE: Final = 4096


class PatchError(ValueError):
    """Not a patch object, or not one for this chunk."""


def _map_bytes(chunk_length: int) -> int:
    return (chunk_length // PAGE + 7) // 8


def patch_bytes(chunk_length: int, pages: int) -> int:
    """The size of a patch carrying ``pages`` pages of a ``chunk_length``-byte chunk."""
    return _HEADER.size + _map_bytes(chunk_length) + pages * PAGE


def encode_patch(chunk: bytes | bytearray | memoryview, pages: npt.NDArray[np.bool_]) -> bytes:
    """The patch carrying ``chunk``'s pages where ``pages`` (one bool per 4 KiB page) is set."""
    length = len(chunk)
    if length % PAGE or len(pages) != length // PAGE:
        raise ValueError(f"a patch of a {length}-byte chunk needs {length // PAGE} page flags, "
                         f"got {len(pages)}")
    rows = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, PAGE)
    bitmap = np.packbits(pages.astype(np.uint8), bitorder="little").tobytes()
    count = int(np.count_nonzero(pages))
    return _HEADER.pack(MAGIC, VERSION, 0, length, count) + bitmap + rows[pages].tobytes()


def apply_patch(root: bytes | bytearray | memoryview, patch: bytes | memoryview) -> bytes:
    """``root`` (a whole chunk) with ``patch``'s pages laid over it; PatchError if ``patch``
    is malformed or is not for a chunk of ``root``'s length."""
    if len(patch) < _HEADER.size:
        raise PatchError(f"a patch object of {len(patch)} bytes has no header")
    magic, version, _zero, length, count = _HEADER.unpack_from(patch, 0)
    if magic != MAGIC or version != VERSION:
        raise PatchError(f"not a patch object (magic {magic!r}, version {version})")
    if length != len(root) or length % PAGE:
        raise PatchError(f"the patch is for a {length}-byte chunk, its root has {len(root)}")
    map_end = _HEADER.size + _map_bytes(length)
    if len(patch) != map_end + count * PAGE:
        raise PatchError(f"a patch of {count} pages must be {map_end + count * PAGE} bytes, "
                         f"got {len(patch)}")
    pages = np.unpackbits(np.frombuffer(patch, dtype=np.uint8, count=map_end - _HEADER.size,
                                        offset=_HEADER.size), bitorder="little",
                          count=length // PAGE).astype(np.bool_)
    if int(np.count_nonzero(pages)) != count:
        raise PatchError(f"the page map names {int(np.count_nonzero(pages))} pages, the header "
                         f"{count}")
    out = np.frombuffer(bytearray(root), dtype=np.uint8).reshape(-1, PAGE)
    out[pages] = np.frombuffer(patch, dtype=np.uint8, offset=map_end).reshape(-1, PAGE)
    return out.tobytes()


def page_map_hex(pages: npt.NDArray[np.bool_]) -> str:
    """The page map as the manifest keeps it (hex of the little-endian bitmap)."""
    return np.packbits(pages.astype(np.uint8), bitorder="little").tobytes().hex()


def parse_page_map(text: str, pages: int) -> npt.NDArray[np.bool_]:
    """The page map of a chunk of ``pages`` pages from :func:`page_map_hex`; PatchError if it
    is not one."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise PatchError(f"page map {text[:20]!r}... is not hex") from None
    if len(raw) != (pages + 7) // 8:
        raise PatchError(f"a page map of {pages} pages is {(pages + 7) // 8} bytes, got "
                         f"{len(raw)}")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[pages:].any():
        raise PatchError("the page map names pages past the chunk's end")
    return bits[:pages].astype(np.bool_)
