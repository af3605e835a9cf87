"""Snapshot and lazy restore: a Firecracker-compatible page-fault handler and its files.

Layering: this package sits beside :mod:`vmmswap.control`, above the data plane. It may import
:mod:`vmmswap.kernel`, :mod:`vmmswap.uffd` and :mod:`vmmswap.dataplane`, never the VM.
"""
