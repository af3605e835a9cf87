"""The torture test: seeded random interleavings through the whole vmm-swap stack.

A scenario is one VMM process (``vmm.py``) with guest memory under a real monitor, worker
threads and forked device processes reading, writing and verifying their pages, and the host
issuing random commands and failures. ``python -m tests.torture --seeds A:B`` runs a seed range;
a printed seed replays exactly the same decisions (the interleaving itself is the machine's).
"""
