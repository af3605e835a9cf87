"""``vmmswap serve-snapshot``: the handler process Firecracker (or ``vmmswap restore``) uses.

It listens on a Unix stream socket (mode 0600, created under a narrowed umask; every peer's uid
is checked with SO_PEERCRED), serves exactly one VMM -- the first that connects and passes the
handshake -- and exits when that VMM closes the connection, printing its counters as one JSON
line. Every descriptor it opens or receives is close-on-exec.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import sys
import threading
import time
from typing import Final

import numpy as np

from vmmswap.snapshot.handshake import HandshakeError, receive_handshake
from vmmswap.snapshot.server import ServeError, SnapshotServer
from vmmswap.snapshot.source import FileSource, MemorySource, OverlaySource
from vmmswap.snapshot.working_set import WorkingSetError, load_working_set, save_working_set
from vmmswap.storage.chunk_source import DEFAULT_CACHE_BYTES, ChunkSource
from vmmswap.uffd.userfaultfd import Userfaultfd

_log = logging.getLogger(__name__)
_UCRED: Final = struct.Struct("3i")


def bind_stream_socket(path: str) -> socket.socket:
    """A listening stream socket at ``path`` with mode 0600; a stale socket file is replaced."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return int(uid)


def open_source(mem_file: str | None, mem_url: str | None = None, *,
                cache_dir: str | None = None, cache_bytes: int | None = None,
                overlay: str | None = None, overlay_pages: str | None = None) -> MemorySource:
    """The memory a handler serves: a local memory file, or a snapshot in an object store
    (``s3://bucket/prefix`` or a store directory) read in verified chunks through a cache;
    with ``overlay``, a diff snapshot's memory laid over it (the pages listed in
    ``overlay_pages``, a working-set format file, come from the diff)."""
    if (mem_file is None) == (mem_url is None):
        raise ValueError("give exactly one of a memory file and a store URL")
    if overlay_pages is not None and overlay is None:
        raise WorkingSetError("--overlay-pages needs --overlay (the diff's memory file)")
    if mem_file is not None:
        base: MemorySource = FileSource.open(mem_file)
    else:
        assert mem_url is not None
        base = ChunkSource.open(mem_url, cache_dir=cache_dir,
                                cache_bytes=cache_bytes or DEFAULT_CACHE_BYTES)
    if overlay is None:
        return base
    try:
        pages = load_working_set(overlay_pages, file_pages=-(-base.size // 4096)) \
            if overlay_pages else None
        if pages is None:
            raise WorkingSetError("--overlay needs --overlay-pages (the diff's page list)")
        marks = np.zeros(-(-base.size // 4096), dtype=np.bool_)
        marks[pages.astype(np.intp)] = True
        diff = FileSource.open(overlay)
        try:
            return OverlaySource(base, diff, marks)
        except BaseException:
            diff.close()
            raise
    except BaseException:
        base.close()
        raise


class StatusWriter:
    """Rewrites a JSON status file (atomically, 0600) every ``interval`` seconds while the
    handler serves: the server's counters and, for a store, the source's (fetches, retries,
    hash failures, reads waiting on the store right now, the last error)."""

    def __init__(self, path: str, source: MemorySource, interval: float = 0.5) -> None:
        self.path = path
        self.source = source
        self.server: SnapshotServer | None = None
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-file", daemon=True)
        self._thread.start()

    def write(self, state: str) -> None:
        doc: dict[str, object] = {"state": state, "time": time.time()}
        if self.server is not None:
            doc["serve"] = self.server.stats.as_dict()
        stats = getattr(self.source, "stats", None)
        if callable(stats):
            doc["source"] = stats()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write("serving" if self.server is not None else "listening")
            except OSError as err:
                _log.warning("cannot write the status file %s: %s", self.path, err)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.write("done")


def serve_one(listener: socket.socket, mem_file: str | MemorySource, *,
              working_set: str | None = None, record: str | None = None,
              record_seconds: float | None = None, status_file: str | None = None,
              ) -> dict[str, float | int]:
    """Accept VMMs until one hands over a valid handshake; serve it until it goes away.
    ``mem_file`` is a path or an open source (see :func:`open_source`; closed at the end)."""
    source = FileSource.open(mem_file) if isinstance(mem_file, str) else mem_file
    status = None
    try:
        size = source.size
        prefetch = (load_working_set(working_set, file_pages=size // 4096)
                    if working_set else None)
        background = getattr(source, "prefetch", None)
        if prefetch is not None and callable(background):
            # A store: fetch the working set's chunks in parallel now; the server's own
            # prefetch (in file order) then copies them in as they arrive.
            background(prefetch * np.uint64(4096))
        if status_file is not None:
            status = StatusWriter(status_file, source)
        while True:
            conn, _ = listener.accept()
            with conn:
                if _peer_uid(conn) != os.getuid():
                    _log.error("refused a peer with uid %d (not ours)", _peer_uid(conn))
                    continue
                try:
                    regions, uffd_fd = receive_handshake(conn, mem_file_size=size)
                except HandshakeError as err:
                    print(f"vmmswap serve-snapshot: refused handshake: {err}", file=sys.stderr)
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps({"error": str(err)}).encode())
                    continue
                os.set_blocking(uffd_fd, False)
                uffd = Userfaultfd.from_raw_descriptor(uffd_fd)
                server = SnapshotServer(uffd, regions, source, prefetch=prefetch,
                                        record=record is not None,
                                        record_seconds=record_seconds)
                if status is not None:
                    status.server = server
                try:
                    stats = server.serve(conn)
                    if record is not None:
                        save_working_set(record, server.recorded_pages())
                finally:
                    server.close()
                    uffd.close()
                result = stats.as_dict()
                source_stats = getattr(source, "stats", None)
                if callable(source_stats):
                    result.update({f"source_{k}": v for k, v in source_stats().items()
                                   if isinstance(v, int)})
                return result
    finally:
        if status is not None:
            status.close()
        source.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vmmswap serve-snapshot",
        description="Serve a snapshot's memory file to one VMM over Firecracker's page-fault "
                    "handler handshake; exit when the VMM closes the socket.")
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--mem-file", help="the snapshot's memory file")
    where.add_argument("--mem-url", metavar="URL",
                       help="a snapshot in an object store (s3://bucket/prefix, credentials "
                       "from AWS_* variables or a profile; or a store directory), fetched in "
                       "verified chunks on demand")
    parser.add_argument("--cache-dir", help="the on-disk chunk cache for --mem-url")
    parser.add_argument("--cache-mib", type=int, default=1024,
                        help="bound of the chunk cache in MiB (default 1024)")
    parser.add_argument("--status-file", metavar="FILE",
                        help="keep FILE updated with the counters (JSON) while serving")
    parser.add_argument("--working-set", help="prefetch the pages of this working-set file")
    parser.add_argument("--record-working-set", metavar="FILE",
                        help="write the pages faulted on demand to FILE at exit")
    parser.add_argument("--record-seconds", type=float,
                        help="record only this long after the first fault")
    parser.add_argument("--overlay", metavar="DIFF",
                        help="a diff snapshot's memory file laid over --mem-file (its base)")
    parser.add_argument("--overlay-pages", metavar="PAGES",
                        help="the diff's page list (.npy of 4 KiB page numbers)")
    args = parser.parse_args(argv)
    if args.cache_mib <= 0:
        parser.error("--cache-mib must be positive")
    try:
        source = open_source(args.mem_file, args.mem_url, cache_dir=args.cache_dir,
                             cache_bytes=args.cache_mib << 20, overlay=args.overlay,
                             overlay_pages=args.overlay_pages)
    except (OSError, ValueError, ImportError) as err:
        print(f"vmmswap serve-snapshot: {err}", file=sys.stderr)
        return 1
    try:
        listener = bind_stream_socket(args.socket)
    except OSError as err:
        source.close()
        print(f"vmmswap serve-snapshot: cannot listen on {args.socket}: {err}", file=sys.stderr)
        return 1
    try:
        print(json.dumps({"listening": args.socket}), flush=True)
        stats = serve_one(listener, source, working_set=args.working_set,
                          record=args.record_working_set, record_seconds=args.record_seconds,
                          status_file=args.status_file)
    except (OSError, ServeError, WorkingSetError) as err:
        print(f"vmmswap serve-snapshot: {err}", file=sys.stderr)
        return 1
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    print(json.dumps(stats), flush=True)
    return 0
