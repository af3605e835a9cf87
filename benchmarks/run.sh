#!/usr/bin/env bash
# Every benchmark, one after the other (each prints its ratios against a baseline measured in the
# same run). Arguments go to none of them; run a script alone for its options (--help).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
for bench in bench_uffd bench_data_plane bench_vm bench_snapshot bench_restart bench_store bench_dirty; do
    echo "== $bench"
    "$python" "$here/$bench.py"
done
