"""The features of a received uffd, read from its fdinfo (the parser, then the kernel)."""

from __future__ import annotations

import os

import pytest

from vmmswap.kernel.uffd import Feature
from vmmswap.uffd.fdinfo import FdinfoError, enabled_features, parse_features
from vmmswap.uffd.userfaultfd import Userfaultfd

SAMPLE = "pos:\t0\nflags:\t02004000\nmnt_id:\t17\npending:\t0\ntotal:\t0\n" \
         "API:\taa:8000b021:80000000000001ff\n"


def test_parse_masks_the_kernels_internal_bit() -> None:
    assert parse_features(SAMPLE) == (Feature.WP_ASYNC | Feature.WP_UNPOPULATED
                                      | Feature.WP_HUGETLBFS_SHMEM | Feature.PAGEFAULT_FLAG_WP
                                      | Feature.MISSING_SHMEM)


@pytest.mark.parametrize("text", ["", "pos:\t0\n", "API:\tzz\n", "API:\taa:xyz:1\n"])
def test_parse_refuses_what_is_not_a_uffds_fdinfo(text: str) -> None:
    with pytest.raises(FdinfoError):
        parse_features(text)


@pytest.mark.parametrize("features", [Feature.MISSING_SHMEM,
                                      Feature.MISSING_SHMEM | Feature.EVENT_REMOVE])
def test_the_kernel_reports_what_was_enabled(features: Feature) -> None:
    with Userfaultfd.new(features) as uffd:
        assert enabled_features(uffd.fileno()) == features
        received = Userfaultfd.from_raw_descriptor(os.dup(uffd.fileno()), None)
        with received:
            assert received.features == features


def test_a_descriptor_that_is_no_uffd_is_refused() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(FdinfoError):
            enabled_features(r)
    finally:
        os.close(r)
        os.close(w)
