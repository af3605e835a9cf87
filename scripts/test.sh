#!/usr/bin/env bash
# The test command: set up, then run the whole suite (CI runs exactly this).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
bash "$repo/scripts/setup.sh"
cd "$repo"
exec "$python" -m pytest "$@"
