"""Fixtures of the review tests: the data-plane rig (agent child + page handler), reused."""

from __future__ import annotations

from dataplane.conftest import make_rig, vmm

__all__ = ["make_rig", "vmm"]
