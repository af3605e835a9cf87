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
from typing import Final

import numpy as np

from vmmswap.snapshot.handshake import HandshakeError, receive_handshake
from vmmswap.snapshot.server import ServeError, SnapshotServer
from vmmswap.snapshot.source import FileSource, MemorySource, OverlaySource
from vmmswap.snapshot.working_set import WorkingSetError, load_working_set, save_working_set
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


def open_source(mem_file: str, overlay: str | None = None,
                overlay_pages: str | None = None) -> MemorySource:
    """The memory file, or a diff snapshot's memory laid over it (pages listed in
    ``overlay_pages``, a working-set format file, come from ``overlay``)."""
    base = FileSource.open(mem_file)
    if overlay is None:
        return base
    try:
        pages = load_working_set(overlay_pages, file_pages=-(-base.size // 4096)) \
            if overlay_pages else None
        if pages is None:
            raise WorkingSetError("--overlay needs --overlay-pages (the diff's page list)")
        marks = np.zeros(-(-base.size // 4096), dtype=np.bool_)
        marks[pages.astype(np.intp)] = True
        return OverlaySource(base, FileSource.open(overlay), marks)
    except BaseException:
        base.close()
        raise


def serve_one(listener: socket.socket, mem_file: str, *, working_set: str | None = None,
              record: str | None = None, record_seconds: float | None = None,
              overlay: str | None = None, overlay_pages: str | None = None,
              ) -> dict[str, float | int]:
    """Accept VMMs until one hands over a valid handshake; serve it until it goes away."""
    source = open_source(mem_file, overlay, overlay_pages)
    try:
        size = source.size
        prefetch = (load_working_set(working_set, file_pages=size // 4096)
                    if working_set else None)
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
                try:
                    stats = server.serve(conn)
                    if record is not None:
                        save_working_set(record, server.recorded_pages())
                finally:
                    server.close()
                    uffd.close()
                return stats.as_dict()
    finally:
        source.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vmmswap serve-snapshot",
        description="Serve a snapshot's memory file to one VMM over Firecracker's page-fault "
                    "handler handshake; exit when the VMM closes the socket.")
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    parser.add_argument("--mem-file", required=True, help="the snapshot's memory file")
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
    try:
        listener = bind_stream_socket(args.socket)
    except OSError as err:
        print(f"vmmswap serve-snapshot: cannot listen on {args.socket}: {err}", file=sys.stderr)
        return 1
    try:
        print(json.dumps({"listening": args.socket}), flush=True)
        stats = serve_one(listener, args.mem_file, working_set=args.working_set,
                          record=args.record_working_set, record_seconds=args.record_seconds,
                          overlay=args.overlay, overlay_pages=args.overlay_pages)
    except (OSError, ServeError, WorkingSetError) as err:
        print(f"vmmswap serve-snapshot: {err}", file=sys.stderr)
        return 1
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    print(json.dumps(stats), flush=True)
    return 0
