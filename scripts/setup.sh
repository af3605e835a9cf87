#!/usr/bin/env bash
# Set up vmmswap on a fresh machine: the package with its dev tools, and the Linux guest's kernel
# and initramfs and memtest86+ (cached outside git; skipped with a warning where apt cannot fetch them).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

# gcc builds the micro-VM's guest, the C baselines and the ABI probes the tests compare against.
if ! command -v gcc >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing gcc" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; } \
            || echo "setup: warning: could not install gcc; tests that compile C will skip" >&2
    else
        echo "setup: warning: gcc is missing; install it or tests that compile C will skip" >&2
    fi
fi

"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -e "$repo[dev]"
# pyenv installs console scripts behind shims that only exist after a rehash.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi
PYTHON=$python bash "$repo/scripts/fetch-linux-guest.sh" --best-effort
PYTHON=$python bash "$repo/scripts/fetch-memtest.sh" --best-effort
