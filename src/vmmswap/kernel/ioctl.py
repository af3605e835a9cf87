"""The ``_IOC`` encoding of ioctl request numbers.

Request numbers are computed, never hard-coded, because the encoding differs between
architectures (powerpc, mips, sparc and alpha use other direction bits and a 13-bit size field).
"""

from __future__ import annotations

import platform

_MACHINE = platform.machine()

if _MACHINE.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
    _IOC_SIZEBITS = 13
    _IOC_DIRBITS = 3
    IOC_NONE = 1
    IOC_READ = 2
    IOC_WRITE = 4
else:
    _IOC_SIZEBITS = 14
    _IOC_DIRBITS = 2
    IOC_NONE = 0
    IOC_WRITE = 1
    IOC_READ = 2

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """The kernel's ``_IOC(dir, type, nr, size)``."""
    if not 0 <= nr < (1 << _IOC_NRBITS):
        raise ValueError(f"ioctl nr {nr:#x} does not fit in {_IOC_NRBITS} bits")
    if not 0 <= type_ < (1 << _IOC_TYPEBITS):
        raise ValueError(f"ioctl type {type_:#x} does not fit in {_IOC_TYPEBITS} bits")
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def io(type_: int, nr: int) -> int:
    """``_IO(type, nr)``: no argument struct."""
    return ioc(IOC_NONE, type_, nr, 0)


def ior(type_: int, nr: int, size: int) -> int:
    """``_IOR(type, nr, size)``: the kernel writes the argument."""
    return ioc(IOC_READ, type_, nr, size)


def iow(type_: int, nr: int, size: int) -> int:
    """``_IOW(type, nr, size)``: the kernel reads the argument."""
    return ioc(IOC_WRITE, type_, nr, size)


def iowr(type_: int, nr: int, size: int) -> int:
    """``_IOWR(type, nr, size)``: the kernel reads and writes the argument."""
    return ioc(IOC_READ | IOC_WRITE, type_, nr, size)
