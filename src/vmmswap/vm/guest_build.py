"""Build the built-in guest from its C source with gcc, and cache the flat binary.

The repository carries no binary blobs: the guest is compiled at first use into
``$XDG_CACHE_HOME/vmmswap`` (default ``~/.cache/vmmswap``; override with ``VMMSWAP_CACHE_DIR``),
under a name derived from a hash of everything that shapes the binary (source, linker script,
flags, ABI constants, compiler version). A changed source therefore rebuilds on its own, and a
stale binary can never be loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vmmswap.vm import layout
from vmmswap.vm.guest_abi import build_defines

_SOURCES = ("workload.c", "workload.ld")
_CFLAGS = (
    "-O2", "-std=gnu11", "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-fno-pie",
    "-no-pie", "-mno-red-zone", "-mgeneral-regs-only", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-fno-builtin",
    "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
)


class GuestBuildError(RuntimeError):
    """gcc or objcopy is missing or failed; the message carries their output."""


@dataclass(frozen=True)
class GuestProgram:
    """A built guest: the flat binary and where it must be loaded and entered."""

    binary: bytes
    load_addr: int
    entry: int
    path: Path


def cache_dir() -> Path:
    explicit = os.environ.get("VMMSWAP_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmmswap"


def _source_dir() -> Path:
    return Path(str(resources.files("vmmswap") / "vm" / "guest"))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(f"{name} not found: the built-in guest is compiled from C at first "
                              "use; install gcc and binutils")
    return path


def _flags() -> list[str]:
    defines = build_defines()
    flags = list(_CFLAGS)
    flags += [f"-D{name}={value:#x}UL" if value > 0x7FFF_FFFF else f"-D{name}={value:#x}"
              for name, value in sorted(defines.items())]
    flags += [f"-Wl,--defsym=PROGRAM_ADDR={layout.PROGRAM_ADDR:#x}",
              f"-Wl,--defsym=PROGRAM_END={layout.PROGRAM_ADDR + layout.PROGRAM_MAX_SIZE:#x}",
              "-Wl,--build-id=none"]
    return flags


def _fingerprint(gcc: str, flags: list[str]) -> str:
    digest = hashlib.sha256()
    src = _source_dir()
    for name in _SOURCES:
        digest.update(name.encode())
        digest.update((src / name).read_bytes())
    digest.update("\0".join(flags).encode())
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    digest.update(version.stdout.encode())
    return digest.hexdigest()[:20]


def build_guest(*, force: bool = False) -> GuestProgram:
    """The built-in workload guest, compiled now if no up-to-date cached build exists."""
    gcc = _tool("gcc")
    flags = _flags()
    out_dir = cache_dir()
    target = out_dir / f"workload-{_fingerprint(gcc, flags)}.bin"
    if force or not target.exists():
        objcopy = _tool("objcopy")
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        src = _source_dir()
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            elf = Path(tmp) / "workload.elf"
            flat = Path(tmp) / "workload.bin"
            _run([gcc, *flags, f"-Wl,-T,{src / 'workload.ld'}", "-o", str(elf),
                  str(src / "workload.c")])
            _run([objcopy, "-O", "binary", "--remove-section=.bss", str(elf), str(flat)])
            os.replace(flat, target)  # atomic: concurrent builders agree on the content
    binary = target.read_bytes()
    if len(binary) > layout.PROGRAM_MAX_SIZE:
        raise GuestBuildError(f"guest binary is {len(binary)} bytes, more than the "
                              f"{layout.PROGRAM_MAX_SIZE} bytes reserved for it")
    return GuestProgram(binary=binary, load_addr=layout.PROGRAM_ADDR, entry=layout.PROGRAM_ADDR,
                        path=target)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(f"building the guest failed ({' '.join(cmd[:1])} exited "
                              f"{proc.returncode}):\n{proc.stderr.strip()}")
