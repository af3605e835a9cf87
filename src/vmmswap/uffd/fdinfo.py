"""What ``/proc/self/fdinfo/FD`` says about a userfaultfd: the features its creator enabled.

Why: a uffd received from another process (the VMM's, a device's) carries the features its
creator asked for at UFFDIO_API time, and the receiver's choices depend on them -- registering
a range for write protection on a uffd without ``WP_ASYNC`` makes every write to a protected
page a *synchronous* fault for the handler, where dirty tracking needs the kernel to resolve
it. The kernel accepts such a registration, so the receiver must ask. The fdinfo of a uffd has
a line ``API:\\t<api>:<features>:<ioctls>`` (hex; the features word includes the kernel's
internal "initialised" bit, which is masked off here).
"""

from __future__ import annotations

from vmmswap.kernel.uffd import KNOWN_FEATURES, Feature

__all__ = ["FdinfoError", "enabled_features", "parse_features"]


class FdinfoError(ValueError):
    """The fdinfo text is not a userfaultfd's (no parsable ``API:`` line)."""


def parse_features(text: str) -> Feature:
    """The enabled features in a uffd's fdinfo text (a pure parser: no I/O)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() != "API":
            continue
        parts = value.strip().split(":")
        if len(parts) != 3:
            break
        try:
            raw = int(parts[1], 16)
        except ValueError:
            break
        return Feature(raw) & KNOWN_FEATURES
    raise FdinfoError(f"not a userfaultfd's fdinfo (no 'API: api:features:ioctls' line): "
                      f"{text[:120]!r}")


def enabled_features(fd: int) -> Feature:
    """The features enabled on the uffd ``fd`` of this process. OSError if the fdinfo cannot
    be read, FdinfoError if ``fd`` is not a uffd."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return parse_features(f.read())
