"""Fixtures for the userfaultfd tests (the peer suite of the kernel's uffd-unit-tests)."""

from __future__ import annotations

import pytest
from uffd_helpers import Probe, build_probe


@pytest.fixture(scope="session")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Probe:
    """The C helper that touches memory and counts SIGBUS (built with gcc once per session)."""
    return build_probe(tmp_path_factory.mktemp("uffd-probe"))
