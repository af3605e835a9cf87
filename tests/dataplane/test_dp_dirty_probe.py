"""Whether to track is decided from the kernel's feature report and one PAGEMAP_SCAN, never
from a version string; each way it can say no is named in the status."""

from __future__ import annotations

import errno

import pytest

from vmmswap.control.monitor_tracking import tracking_mode
from vmmswap.dataplane import dirty
from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.pagemap_scan import Pagemap
from vmmswap.uffd.userfaultfd import KernelSupport, Userfaultfd

_REAL = Userfaultfd.probe()


def _report(features: Feature) -> KernelSupport:
    return KernelSupport(features, _REAL.ioctls)


def test_without_wp_async_in_the_feature_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Userfaultfd, "probe",
                        staticmethod(lambda **_: _report(Feature.MISSING_SHMEM
                                                         | Feature.PAGEFAULT_FLAG_WP)))
    support = dirty.probe_tracking()
    assert not support.available and "WP_ASYNC" in support.reason
    assert dirty.swap_features() == dirty.VMM_SWAP_FEATURES  # nothing asked that is not there


def test_without_pagemap_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scan(*_: object, **__: object) -> None:
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    monkeypatch.setattr(Pagemap, "scan", no_scan)
    if dirty.DIRTY_TRACKING_FEATURES not in Userfaultfd.probe().features:
        pytest.skip("this kernel lacks the uffd features already")
    support = dirty.probe_tracking()
    assert not support.available and "PAGEMAP_SCAN" in support.reason


def test_the_monitors_decision_names_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking_mode(False) == (False, "not asked for (dirty_tracking is off)")
    monkeypatch.setattr("vmmswap.control.monitor_tracking.probe_tracking",
                        lambda: dirty.TrackingSupport(False, "no PAGEMAP_SCAN"))
    assert tracking_mode(True) == (False, "no PAGEMAP_SCAN")
    monkeypatch.setattr("vmmswap.control.monitor_tracking.probe_tracking",
                        lambda: dirty.TrackingSupport(True, ""))
    assert tracking_mode(True) == (True, "")
