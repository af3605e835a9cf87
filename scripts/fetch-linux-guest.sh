#!/usr/bin/env bash
# Fetch the Linux guest for vmmswap's real-kernel tests and demo, outside git:
#   * Debian's x86-64 kernel (linux-image-amd64 is a metapackage: its linux-image-*-amd64
#     dependency holds /boot/vmlinuz, a bzImage),
#   * Debian's busybox-static,
#   * an initramfs (cpio newc, gzip) of busybox + src/vmmswap/vm/linux/init.sh.
# Idempotent: does nothing when the cache is complete and was built from the current init.sh.
#
# Cache: $VMMSWAP_LINUX_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/vmmswap/linux. It ends up with
#   bzImage, initramfs.cpio.gz, kernel.config, MANIFEST (package versions and the init.sh hash).
# Options: --force (fetch and build again), --best-effort (exit 0 with a warning on failure, for
# CI machines that may lack apt; the tests then skip with a reason).
set -euo pipefail

fetch_name=fetch-linux-guest
fetch_help_lines=2,13
# shellcheck source=lib/fetch-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/fetch-common.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${VMMSWAP_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmmswap/linux}
init_script=$repo/src/vmmswap/vm/linux/init.sh
builder=$repo/src/vmmswap/vm/linux/initramfs.py
python=${PYTHON:-python3}

init_hash=$(sha256sum "$init_script" | cut -d' ' -f1)
builder_hash=$(sha256sum "$builder" | cut -d' ' -f1)

manifest_has() { [ -f "$cache/MANIFEST" ] && grep -qx "$1" "$cache/MANIFEST"; }

build_initramfs() {
    "$python" "$builder" --busybox "$cache/busybox" --init "$init_script" \
        --output "$cache/initramfs.cpio.gz" >/dev/null || fail "building the initramfs failed"
    grep -v -e '^init_sha256=' -e '^builder_sha256=' "$cache/MANIFEST" >"$cache/MANIFEST.new" || true
    {
        echo "init_sha256=$init_hash"
        echo "builder_sha256=$builder_hash"
    } >>"$cache/MANIFEST.new"
    mv "$cache/MANIFEST.new" "$cache/MANIFEST"
}

if [ "$force" = 0 ] && [ -s "$cache/bzImage" ] && [ -x "$cache/busybox" ] \
    && manifest_has "kernel_complete=1"; then
    if [ -s "$cache/initramfs.cpio.gz" ] && manifest_has "init_sha256=$init_hash" \
        && manifest_has "builder_sha256=$builder_hash"; then
        echo "fetch-linux-guest: cache complete at $cache"
    else
        build_initramfs
        echo "fetch-linux-guest: rebuilt $cache/initramfs.cpio.gz from $init_script"
    fi
    exit 0
fi

fetch_workdir "$cache"

# Resolves the metapackage to the real kernel package (e.g. linux-image-6.1.0-50-amd64).
resolve_kernel() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}

kernel_pkg=$(resolve_kernel || true)
if [ -z "$kernel_pkg" ]; then
    echo "fetch-linux-guest: package lists are empty or stale, running apt-get update"
    apt-get "${apt_opts[@]}" update -qq || fail "apt-get update failed"
    kernel_pkg=$(resolve_kernel || true)
fi
[ -n "$kernel_pkg" ] || fail "cannot resolve linux-image-amd64 to a linux-image-*-amd64 package"

fetch_download "$kernel_pkg" busybox-static

dpkg-deb -x "$work"/"$kernel_pkg"_*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
vmlinuz=$(find "$work/kernel/boot" -name 'vmlinuz-*' | head -n1)
config=$(find "$work/kernel/boot" -name 'config-*' | head -n1)
[ -n "$vmlinuz" ] || fail "$kernel_pkg has no /boot/vmlinuz-*"
[ -x "$work/busybox/bin/busybox" ] || fail "busybox-static has no /bin/busybox"

# The guest needs these built in: the serial console, a gzip initramfs, tmpfs and /dev/port.
if [ -n "$config" ]; then
    for option in SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP TMPFS DEVTMPFS DEVPORT SMP; do
        grep -qx "CONFIG_$option=y" "$config" || fail "$kernel_pkg lacks CONFIG_$option=y"
    done
fi

install -m 0644 "$vmlinuz" "$cache/bzImage"
[ -n "$config" ] && install -m 0644 "$config" "$cache/kernel.config"
install -m 0755 "$work/busybox/bin/busybox" "$cache/busybox"
{
    echo "kernel_package=$kernel_pkg"
    echo "kernel_version=$(dpkg-deb -f "$work"/"$kernel_pkg"_*.deb Version)"
    echo "busybox_version=$(dpkg-deb -f "$work"/busybox-static_*.deb Version)"
    echo "kernel_complete=1"
} >"$cache/MANIFEST"
build_initramfs
echo "fetch-linux-guest: $kernel_pkg and busybox-static ready in $cache"
