"""vmm-swap for Python.

A virtual machine's guest memory is moved out of RAM -- first to staging memory, then to a swap
file -- and brought back page by page, on demand, through Linux userfaultfd, while the guest keeps
running. See DESIGN.md for the layer map.
"""

__version__ = "0.1.0"
