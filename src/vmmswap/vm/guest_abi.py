"""The contract between the built-in guest program and the VMM: ports, opcodes, the pattern.

These values are passed to gcc as ``-D`` flags when the guest is built (see
:mod:`vmmswap.vm.guest_build`), so the C source and the host agree by construction. The pattern
and checksum functions are reimplemented here with numpy so tests can check the guest's numbers
independently of the guest's own code.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

import numpy as np
import numpy.typing as npt

from vmmswap.vm import layout
from vmmswap.vm.longmode import CODE_SELECTOR, USER_CODE_SELECTOR, USER_DATA_SELECTOR

# One block of ports per vCPU: the vCPU reads its next command and arguments from it and writes
# results to it. Blocks start at WORKLOAD_PORT_BASE, PORT_STRIDE apart.
WORKLOAD_PORT_BASE: Final = 0x700
PORT_STRIDE: Final = 0x10
PORT_CMD: Final = 0x0  # in32: the next opcode (the vCPU waits here for the host)
PORT_ARG: Final = 0x4  # in32: the next argument word (64-bit arguments are two words, low first)
PORT_RESULT: Final = 0x8  # out32: one result word
PORT_DONE: Final = 0xC  # out32: the command finished with this status

# The balloon: the guest writes a range and reads the status of giving it back.
BALLOON_PORT: Final = 0x6E0
BALLOON_PORT_COUNT: Final = 0x14
BALLOON_ADDR_LO: Final = 0x0
BALLOON_ADDR_HI: Final = 0x4
BALLOON_LEN_LO: Final = 0x8
BALLOON_LEN_HI: Final = 0xC
BALLOON_GO: Final = 0x10  # in32: 0 on success, else an errno

DEBUG_CONSOLE_PORT: Final = 0xE9  # out8: a character (bochs/QEMU convention)


class Op(IntEnum):
    """Workload commands."""

    NOP = 0
    FILL = 1  # start, len, seed: write the pattern of ``seed`` (0 = zeros)
    READ = 2  # start, len: read every qword; reports their sum
    VERIFY = 3  # start, len, seed: compare with the pattern; reports mismatches, first bad addr
    CHECKSUM = 4  # start, len, chunk: one checksum per chunk
    BALLOON = 5  # start, len: give the range back to the host
    EXIT = 6  # acknowledge; the host then ends this vCPU
    TORTURE = 7  # start, len, table, seed, ops | flags << 32: seeded random write/verify/balloon


class TortureFlag(IntFlag):
    """Flags of the TORTURE command (the high word of its last argument)."""

    BALLOON = 1  # some runs are given back through the balloon (one vCPU at a time: one port)
    CHECK_ALL = 2  # no random work: verify every page against its version, once


#: Results of TORTURE after the histogram: writes, verifies, balloons, pages checked, then
#: mismatched qwords, the first bad address, its expected version and the qword read there.
TORTURE_RESULTS: Final = 8


STATUS_OK: Final = 0
STATUS_BAD_OPCODE: Final = 0xBAD0_0000
STATUS_EXCEPTION: Final = 0xE000_0000  # | vector; results: vector, error code, rip, cr2 (u64s)

HIST_BUCKETS: Final = 496
CHECKSUM_MAX_CHUNKS: Final = 512

PATTERN_SEED_MULT: Final = 0xD1B5_4A32_D192_ED03
PATTERN_GOLDEN: Final = 0x9E37_79B9_7F4A_7C15

_U64 = np.uint64


def _mix(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58_476D_1CE4_E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D0_49BB_1331_11EB)
    return z ^ (z >> _U64(31))


def pattern(start: int, length: int, seed: int) -> npt.NDArray[np.uint64]:
    """The qwords the guest writes to ``[start, start+length)`` for ``seed`` (0 = zeros)."""
    count = length // 8
    if seed == 0:
        return np.zeros(count, dtype=np.uint64)
    addrs = np.arange(start, start + 8 * count, 8, dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = _U64((seed * PATTERN_SEED_MULT + PATTERN_GOLDEN) % (1 << 64))
        return _mix((addrs >> _U64(3)) + base)


def checksum(start: int, values: npt.NDArray[np.uint64]) -> int:
    """The guest's checksum of ``values`` located at guest-physical ``start``."""
    addrs = np.arange(start, start + 8 * len(values), 8, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(_mix(values ^ addrs).sum(dtype=np.uint64))


def build_defines() -> dict[str, int]:
    """Every constant the C source needs, by name."""
    defines = {
        "PORT_BASE": WORKLOAD_PORT_BASE, "PORT_STRIDE": PORT_STRIDE, "PORT_CMD": PORT_CMD,
        "PORT_ARG": PORT_ARG, "PORT_RESULT": PORT_RESULT, "PORT_DONE": PORT_DONE,
        "BALLOON_PORT": BALLOON_PORT, "BALLOON_ADDR_LO": BALLOON_ADDR_LO,
        "BALLOON_ADDR_HI": BALLOON_ADDR_HI, "BALLOON_LEN_LO": BALLOON_LEN_LO,
        "BALLOON_LEN_HI": BALLOON_LEN_HI, "BALLOON_GO": BALLOON_GO,
        "STATUS_BAD_OPCODE": STATUS_BAD_OPCODE, "STATUS_EXCEPTION": STATUS_EXCEPTION,
        "HIST_BUCKETS": HIST_BUCKETS, "CHECKSUM_MAX_CHUNKS": CHECKSUM_MAX_CHUNKS,
        "PATTERN_SEED_MULT": PATTERN_SEED_MULT, "PATTERN_GOLDEN": PATTERN_GOLDEN,
        "STACKS_BASE": layout.STACKS_BASE, "STACK_SIZE": layout.STACK_SIZE,
        "MAX_VCPUS": layout.MAX_VCPUS, "CODE_SELECTOR": CODE_SELECTOR,
        "USER_CODE_SELECTOR": USER_CODE_SELECTOR, "USER_DATA_SELECTOR": USER_DATA_SELECTOR,
    }
    defines.update({f"OP_{op.name}": int(op) for op in Op})
    defines.update({f"TORTURE_{flag.name}": int(flag) for flag in TortureFlag})
    return defines
