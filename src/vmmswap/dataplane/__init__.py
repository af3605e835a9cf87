"""The data plane: where guest pages live and how they move.

Guest memory (memfd regions), present lists (numpy bitmaps), staging memory, the nameless swap
file with its packed slots, readahead, the fill path, and the page handler with the resumable
work behind each command (move to staging, trim, swap out, swap in), plus the counters all of
them keep (metrics.py).

May import: ``vmmswap.kernel`` and ``vmmswap.uffd``. Never the control plane: no processes,
sockets or state machine here, so every piece can be driven directly by a test.
"""
