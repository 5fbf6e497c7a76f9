#!/usr/bin/env bash
# Build virtiofsd (the vhost-user virtio-fs backend capsa-vmm's `--fs` device talks to) from crates.io and put it
# at build/virtiofsd (inside the workspace, so the nested test host sees it at the same path).
#
# The build is cached under ${CAPSA_CACHE:-/var/cache/capsa}/virtiofsd-<version>/bin/virtiofsd; a cached binary is
# only copied. Needs libseccomp-dev, libcap-ng-dev and pkg-config (installed with apt-get when missing and root).
#
# usage: build-virtiofsd.sh [out]            (out defaults to build/virtiofsd in the repo)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VERSION=1.14.0
CACHE="${CAPSA_CACHE:-/var/cache/capsa}/virtiofsd-$VERSION"
OUT="${1:-$ROOT/build/virtiofsd}"
die() { echo "virtiofsd: error: $*" >&2; exit 1; }

if [[ ! -x $CACHE/bin/virtiofsd ]]; then
    missing=()
    for pkg in libseccomp-dev libcap-ng-dev pkg-config; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]} (apt-get install them)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
    mkdir -p "$CACHE"
    echo "virtiofsd: building $VERSION into $CACHE (cargo install, several minutes)" >&2
    # A private target dir: never touch the workspace's.
    CARGO_TARGET_DIR="$CACHE/target" cargo install virtiofsd --version "$VERSION" --locked --root "$CACHE" >&2
    rm -rf "$CACHE/target"
fi
[[ -x $CACHE/bin/virtiofsd ]] || die "$CACHE/bin/virtiofsd missing after the build"
mkdir -p "$(dirname "$OUT")"
if ! cmp -s "$CACHE/bin/virtiofsd" "$OUT"; then
    install -m 0755 "$CACHE/bin/virtiofsd" "$OUT.tmp"
    mv -f "$OUT.tmp" "$OUT"
fi
echo "$OUT"
