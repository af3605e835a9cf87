"""The control plane: the monitor process, the VMM's controller and the wire between them.

The state machine (free of I/O), the control protocol and its 0600 socket, freezing the VMM's
process tree and the thaw guard, device-process registration, swap-file cleanup, the monitor's
epoll loop, and ``SwapController``, the one object a VMM holds.

May import: ``vmmswap.kernel``, ``vmmswap.uffd`` and ``vmmswap.dataplane``. Never ``cli`` or
``vm``, which stand on top of it.
"""
