"""A stand-in for Firecracker's side of the page-fault handler handshake, as its docs describe.

Run as a child process: it creates the userfaultfd (EVENT_REMOVE, like Firecracker), maps and
registers guest memory, connects to the handler's socket, sends the exact JSON message with
the uffd attached, then reads guest memory only through GIL-releasing calls (``os.write`` of
the guest range to a file: the kernel's copy faults, never Python code).

    fake_firecracker.py SOCKET MODE OUT REGION_SIZE [REGIONS]

MODE: ``new`` (page_size), ``kib`` (page_size_kib), ``remove`` (balloon: MADV_DONTNEED the
second half of region 0 after the first read, then read again), ``raw:<json>`` (send this
message as is and exit), ``exit`` (handshake, then close without touching memory),
``runs:<file>`` (touch every 4 KiB page of the ``[file_offset, length]`` runs listed in the
JSON file, in that order, then print ``{"first_touch_s", "seconds"}``: from the handshake to
the first page read and to the last; the benchmarks' re-touch of a working set).
"""

from __future__ import annotations

import array
import json
import socket
import sys
import time

import numpy as np

from vmmswap.kernel.libc import MADV_DONTNEED
from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.memory import Mapping
from vmmswap.uffd.userfaultfd import Userfaultfd


def main() -> int:
    path, mode, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    count = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    uffd = Userfaultfd.new(Feature.EVENT_REMOVE)
    regions = [Mapping.anonymous(size) for _ in range(count)]
    for m in regions:
        uffd.register(m.address, m.length)
    key = "page_size_kib" if mode == "kib" else "page_size"
    message = json.dumps([{"base_host_virt_addr": m.address, "size": m.length,
                           "offset": i * size, key: 4096} for i, m in enumerate(regions)])
    if mode.startswith("raw:"):
        message = mode[4:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendmsg([message.encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd.fileno()]))])
    if mode.startswith("raw:") or mode == "exit":
        sock.settimeout(2)
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            reply = b""
        sock.close()
        with open(out, "wb") as f:
            f.write(reply)
        return 0
    if mode.startswith("runs:"):
        with open(mode[5:]) as f:
            runs = json.load(f)
        t0 = time.monotonic()
        # One 8-byte read per 4 KiB page, as a guest touching its working set: the faults, not
        # a copy of the data, are what is timed. (This process is not the handler, so its
        # own faults holding the GIL block nobody else.)
        qwords = [np.frombuffer(m.as_ctypes(), dtype=np.uint64) for m in regions]
        first = 0.0
        total = 0
        for n, (offset, length) in enumerate(runs):
            region, at = divmod(offset, size)
            if n == 0:
                total += int(qwords[region][at // 8])
                first = time.monotonic() - t0
            total += int(qwords[region][at // 8:(at + length) // 8:512].sum(dtype=np.uint64))
        seconds = time.monotonic() - t0
        with open(out, "w") as f:
            f.write(f"{total % (1 << 64)}\n")
        print(json.dumps({"first_touch_s": first, "seconds": seconds}))
        sock.close()
        return 0
    with open(out, "wb", buffering=0) as f:
        for m in regions:
            f.write(memoryview(m.as_ctypes()).cast("B"))  # faults inside the kernel's copy
        if mode == "remove":
            half = size // 2
            regions[0].madvise(MADV_DONTNEED, half, size - half)
            f.write(memoryview(regions[0].as_ctypes()).cast("B"))
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
