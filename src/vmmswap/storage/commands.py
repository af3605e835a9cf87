"""``vmmswap store put|get|info``: snapshots' memory in an object store, from the command line.

``put MEM_FILE URL`` uploads a memory file (Firecracker's layout: regions back to back) as the
snapshot at ``URL`` -- ``s3://bucket/prefix`` (endpoint, region and credentials from the usual
``AWS_*`` variables or a profile) or a store directory. Chunks already in the pool beside the
prefix are not sent again, so a second snapshot of the same guest uploads what changed, and an
interrupted upload resumes; the manifest goes up last, so a snapshot that is visible is whole.
``get URL MEM_FILE`` writes a snapshot back to a local file (eager restore, verification);
``info URL`` prints its manifest's summary. Every command prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from vmmswap.snapshot.source import FileSource, SourceError
from vmmswap.storage.chunk_source import ChunkSource
from vmmswap.storage.manifest import (
    DEFAULT_CHUNK_SIZE,
    ManifestError,
    load_manifest,
)
from vmmswap.storage.store import StoreError, open_store
from vmmswap.storage.upload import upload_memory

#: Bytes ``get`` copies per read.
_GET_BLOCK = 8 << 20


def parse_regions(text: str | None, size: int) -> list[tuple[int, int]] | None:
    """``SIZE[,SIZE...]`` in bytes (suffixes K, M, G) -> ``(offset, size)`` back to back; they
    must cover the file exactly. None for the whole file as one region."""
    if not text:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    spans, offset = [], 0
    for raw in text.split(","):
        part = raw.strip().upper()
        scale = units.get(part[-1:], 1)
        digits = part[:-1] if part[-1:] in units else part
        if not digits.isdigit() or int(digits) == 0:
            raise ValueError(f"region size {part!r} is not a positive number of bytes")
        length = int(digits) * scale
        spans.append((offset, length))
        offset += length
    if offset != size:
        raise ValueError(f"the regions add up to {offset} bytes; the memory file has {size}")
    return spans


def _put(args: argparse.Namespace) -> dict[str, object]:
    chunk = args.chunk_kib * 1024
    if chunk <= 0 or chunk % 4096:
        raise ValueError(f"--chunk-kib {args.chunk_kib}: a positive multiple of 4")
    if args.workers <= 0:
        raise ValueError("--workers must be positive")
    if (args.base is None) != (args.changed is None):
        raise ValueError("a diff needs both --base URL and --changed PAGES.npy")
    source = FileSource.open(args.mem_file)
    try:
        regions = parse_regions(args.regions, source.size)
        store, prefix = open_store(args.url)
        base = changed = None
        if args.base is not None:
            base_store, base_prefix = open_store(args.base)
            if base_store.url != store.url:
                raise ValueError("a diff's base must be in the same store")
            base = load_manifest(store, base_prefix)
            changed = np.load(args.changed, allow_pickle=False)
            if changed.dtype != np.bool_ or changed.ndim != 1:
                raise ValueError(f"{args.changed}: expected a 1-D bool array (one flag per "
                                 f"4 KiB page written since the base), got {changed.dtype}")
        manifest, stats = upload_memory(store, prefix, source, regions=regions,
                                        chunk_size=chunk, workers=args.workers, base=base,
                                        changed=changed,
                                        parent=args.base)
    finally:
        source.close()
    return {"url": args.url, "size": manifest.size, "chunk_size": manifest.chunk_size,
            "stored_bytes": manifest.stored_bytes(), **stats.as_dict()}


def _get(args: argparse.Namespace) -> dict[str, object]:
    if os.path.lexists(args.mem_file) and not args.force:
        raise FileExistsError(f"{args.mem_file} exists (--force to overwrite)")
    source = ChunkSource.open(args.url, give_up_after=args.give_up_after)
    # Written beside it under a temporary name and renamed when whole: a get that fails
    # leaves no file of holes that could later be served as the snapshot's memory.
    tmp = f"{args.mem_file}.{os.getpid()}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        renamed = False
        try:
            os.ftruncate(fd, source.size)
            buf = bytearray(_GET_BLOCK)
            zero = bytes(_GET_BLOCK)
            for offset in range(0, source.size, _GET_BLOCK):
                n = min(_GET_BLOCK, source.size - offset)
                view = memoryview(buf)[:n]
                source.read_into(offset, view)
                if view != zero[:n]:  # zeros stay holes
                    os.pwrite(fd, view, offset)
            os.fsync(fd)
            if not args.force and os.path.lexists(args.mem_file):
                raise FileExistsError(f"{args.mem_file} appeared meanwhile (--force to "
                                      "overwrite)")
            os.rename(tmp, args.mem_file)
            renamed = True
        finally:
            os.close(fd)
            if not renamed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        stats = source.stats()
    finally:
        source.close()
    return {"url": args.url, "mem_file": args.mem_file, "size": source.size, **stats}


def _info(args: argparse.Namespace) -> dict[str, object]:
    store, prefix = open_store(args.url)
    m = load_manifest(store, prefix)
    chunks = [c for r in m.regions for c in r.chunks]
    return {"url": args.url, "size": m.size, "chunk_size": m.chunk_size,
            "regions": [[r.offset, r.size] for r in m.regions], "chunks": len(chunks),
            "zero_chunks": sum(c is None for c in chunks), "distinct_chunks": len(m.digests()),
            "patched_chunks": m.patched, "stored_bytes": m.stored_bytes(), "pool": m.pool,
            "files": sorted(m.files),
            "parent": m.parent}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmmswap store",
                                     description="Snapshot memory in an object store.")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("put", help="upload a memory file as a snapshot")
    p.add_argument("mem_file", metavar="MEM_FILE")
    p.add_argument("url", metavar="URL", help="s3://bucket/prefix or a store directory")
    p.add_argument("--regions", help="region sizes, SIZE[,SIZE...] (default: one region)")
    p.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK_SIZE // 1024,
                   help=f"chunk size in KiB (default {DEFAULT_CHUNK_SIZE // 1024})")
    p.add_argument("--workers", type=int, default=8, help="uploads in flight (default 8)")
    p.add_argument("--base", metavar="URL", help="a diff of this snapshot (same store and "
                   "pool): chunks with no page written are its, changed ones go up as patches")
    p.add_argument("--changed", metavar="PAGES.npy", help="with --base: a bool per 4 KiB page "
                   "of MEM_FILE, True where it was written since the base (dirty tracking)")
    p = sub.add_parser("get", help="write a snapshot's memory to a local file")
    p.add_argument("url", metavar="URL")
    p.add_argument("mem_file", metavar="MEM_FILE")
    p.add_argument("--force", action="store_true", help="overwrite MEM_FILE")
    p.add_argument("--give-up-after", type=float, default=60.0, metavar="SECONDS",
                   help="fail when the store has not answered for SECONDS (default 60)")
    p = sub.add_parser("info", help="summarise a snapshot's manifest")
    p.add_argument("url", metavar="URL")
    args = parser.parse_args(argv)
    action = {"put": _put, "get": _get, "info": _info}[args.action]
    try:
        result = action(args)
    except (OSError, ValueError, ImportError, SourceError) as err:
        # StoreError is an OSError, ManifestError a ValueError: both named in the message.
        kind = "store" if isinstance(err, StoreError) else (
            "manifest" if isinstance(err, ManifestError) else "error")
        print(f"vmmswap store {args.action}: {kind}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
