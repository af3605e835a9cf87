#!/usr/bin/env bash
# Fetch Debian's memtest86+ (the 64-bit boot-protocol image memtest86+x64.bin) for vmmswap's
# memtest guest, outside git. Idempotent: does nothing when the cache already holds the image.
#
# Cache: $VMMSWAP_MEMTEST_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/vmmswap/memtest. It ends up
#   with memtest86+x64.bin and MANIFEST (the package version).
# Options: --force (fetch again), --best-effort (exit 0 with a warning on failure; the tests then
# skip with a reason).
set -euo pipefail

force=0
best_effort=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --best-effort) best_effort=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "fetch-memtest: unknown option $arg" >&2; exit 2 ;;
    esac
done

cache=${VMMSWAP_MEMTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmmswap/memtest}
image=memtest86+x64.bin

fail() {
    echo "fetch-memtest: $*" >&2
    if [ "$best_effort" = 1 ]; then
        echo "fetch-memtest: continuing without memtest86+ (--best-effort)" >&2
        exit 0
    fi
    exit 1
}

if [ "$force" = 0 ] && [ -s "$cache/$image" ] && [ -f "$cache/MANIFEST" ]; then
    echo "fetch-memtest: cache complete at $cache"
    exit 0
fi

command -v apt-get >/dev/null || fail "apt-get not found: this needs a Debian-based machine"
command -v dpkg-deb >/dev/null || fail "dpkg-deb not found"
mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

apt_opts=()
# As root, apt drops to the _apt user for downloads and warns that it cannot write here.
[ "$(id -u)" = 0 ] && apt_opts+=(-o APT::Sandbox::User=root)

download() {
    (cd "$work" && apt-get "${apt_opts[@]}" download -qq memtest86+)
}
if ! download; then
    echo "fetch-memtest: download failed, running apt-get update and trying again"
    apt-get "${apt_opts[@]}" update -qq || fail "apt-get update failed"
    download || fail "apt-get download memtest86+ failed"
fi

dpkg-deb -x "$work"/memtest86+_*.deb "$work/pkg"
[ -s "$work/pkg/boot/$image" ] || fail "memtest86+ has no /boot/$image"
install -m 0644 "$work/pkg/boot/$image" "$cache/$image"
echo "memtest_version=$(dpkg-deb -f "$work"/memtest86+_*.deb Version)" >"$cache/MANIFEST"
echo "fetch-memtest: memtest86+ ready in $cache"
