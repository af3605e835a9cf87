"""Fixtures for the control-plane tests: test VMMs over the fake or the real page handler."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from control_helpers import FAKE_FACTORY, TestVmm


def real_handler_available() -> bool:
    return importlib.util.find_spec("vmmswap.dataplane.page_handler") is not None


@pytest.fixture(params=["fake", "real"])
def handler_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment for the test VMM: the fake handler, or the data plane's PageHandler."""
    if request.param == "fake":
        return {"VMMSWAP_TEST_HANDLER_FACTORY": FAKE_FACTORY}
    if not real_handler_available():
        pytest.skip("vmmswap.dataplane.page_handler (the data plane) is not there yet")
    return {}


@pytest.fixture
def make_vmm(handler_env: dict[str, str]) -> Iterator[Callable[..., TestVmm]]:
    vmms: list[TestVmm] = []

    def make(**extra_env: str) -> TestVmm:
        vmm = TestVmm(env={**handler_env, **extra_env})
        vmms.append(vmm)
        return vmm

    yield make
    for vmm in vmms:
        vmm.close()


@pytest.fixture
def swap_dir(tmp_path: Path) -> Path:
    path = tmp_path / "swap"
    path.mkdir()
    return path


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs for disk-full tests (needs root; skipped where mount is refused)."""
    path = tmp_path / "tiny"
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "none",
                             str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {result.stderr.strip() or 'mount failed'}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


