# Shared by the scripts that fetch a guest from Debian's archive into a cache outside git
# (fetch-linux-guest.sh, fetch-memtest.sh). Source it after setting `fetch_name` (the prefix of
# every message) and `fetch_help_lines` (the sed range of the caller's header comment).
#
# It parses the common options (--force: fetch again; --best-effort: a failure warns and exits
# 0, so tests that need the guest skip with a reason instead of CI failing on a machine without
# apt), and gives the callers `fail`, `fetch_workdir` and `fetch_download`.

force=0
best_effort=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --best-effort) best_effort=1 ;;
        -h|--help) sed -n "${fetch_help_lines}p" "$0"; exit 0 ;;
        *) echo "$fetch_name: unknown option $arg" >&2; exit 2 ;;
    esac
done

fail() {
    echo "$fetch_name: $*" >&2
    if [ "$best_effort" = 1 ]; then
        echo "$fetch_name: continuing without it (--best-effort)" >&2
        exit 0
    fi
    exit 1
}

apt_opts=()
# As root, apt drops to the _apt user for downloads and warns that it cannot write there.
[ "$(id -u)" = 0 ] && apt_opts+=(-o APT::Sandbox::User=root)

# fetch_workdir CACHE: checks for apt, creates CACHE and a work directory in it (removed on
# exit, so an interrupted fetch leaves nothing half-installed), and sets `work`.
fetch_workdir() {
    command -v apt-get >/dev/null || fail "apt-get not found: this needs a Debian-based machine"
    command -v dpkg-deb >/dev/null || fail "dpkg-deb not found"
    mkdir -p "$1"
    work=$(mktemp -d "$1/.fetch.XXXXXX")
    trap 'rm -rf "$work"' EXIT
}

# fetch_download PACKAGE...: the .deb files into $work, with one `apt-get update` and retry
# when the package lists are stale.
fetch_download() {
    if ! (cd "$work" && apt-get "${apt_opts[@]}" download -qq "$@"); then
        echo "$fetch_name: download failed, running apt-get update and trying again"
        apt-get "${apt_opts[@]}" update -qq || fail "apt-get update failed"
        (cd "$work" && apt-get "${apt_opts[@]}" download -qq "$@") \
            || fail "apt-get download $* failed"
    fi
}
