#!/usr/bin/env bash
# Set up vmmswap on a fresh machine: the package with its dev tools, and the Linux guest's kernel
# and initramfs (cached outside git; skipped with a warning where apt cannot fetch them).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -e "$repo[dev]"
# pyenv installs console scripts behind shims that only exist after a rehash.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi
PYTHON=$python bash "$repo/scripts/fetch-linux-guest.sh" --best-effort
