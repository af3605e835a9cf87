"""Tests of the vmm-swap data plane (page handler, staging, swap file, readahead)."""
