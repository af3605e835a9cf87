"""Compiling the C baselines of the benchmarks, once per version of their source.

The binary is cached under ``$XDG_CACHE_HOME/vmmswap-bench`` (default ``~/.cache``), named by a
hash of the source and of the headers beside it (``c/uffd_uapi.h``), so an edit to either
rebuilds it and an unchanged one is not compiled again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def build_c(source: Path, cache_dir: Path | None = None) -> Path:
    """The compiled ``source`` (``gcc -O2 -Wall``); SystemExit when no C compiler exists."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit(f"{source.name}: gcc is needed to build this C reference")
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        digest.update(header.read_bytes())
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    out_dir = base / "vmmswap-bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / f"{source.stem}-{digest.hexdigest()[:16]}"
    if not binary.exists():
        with tempfile.NamedTemporaryFile(dir=out_dir, delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            subprocess.run([gcc, "-O2", "-Wall", "-o", str(tmp_path), str(source)], check=True)
            tmp_path.replace(binary)
        finally:
            tmp_path.unlink(missing_ok=True)
    return binary
