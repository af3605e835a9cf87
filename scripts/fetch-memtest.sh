#!/usr/bin/env bash
# Fetch Debian's memtest86+ (the 64-bit boot-protocol image memtest86+x64.bin) for vmmswap's
# memtest guest, outside git. Idempotent: does nothing when the cache already holds the image.
#
# Cache: $VMMSWAP_MEMTEST_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/vmmswap/memtest. It ends up
#   with memtest86+x64.bin and MANIFEST (the package version).
# Options: --force (fetch again), --best-effort (exit 0 with a warning on failure; the tests then
# skip with a reason).
set -euo pipefail

fetch_name=fetch-memtest
fetch_help_lines=2,8
# shellcheck source=lib/fetch-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/fetch-common.sh"

cache=${VMMSWAP_MEMTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmmswap/memtest}
image=memtest86+x64.bin

if [ "$force" = 0 ] && [ -s "$cache/$image" ] && [ -f "$cache/MANIFEST" ]; then
    echo "fetch-memtest: cache complete at $cache"
    exit 0
fi

fetch_workdir "$cache"
fetch_download memtest86+

dpkg-deb -x "$work"/memtest86+_*.deb "$work/pkg"
[ -s "$work/pkg/boot/$image" ] || fail "memtest86+ has no /boot/$image"
install -m 0644 "$work/pkg/boot/$image" "$cache/$image"
echo "memtest_version=$(dpkg-deb -f "$work"/memtest86+_*.deb Version)" >"$cache/MANIFEST"
echo "fetch-memtest: memtest86+ ready in $cache"
