#!/usr/bin/env bash
# Build capsa's guest initrd: a newc cpio archive with /init = the given binary (capsa-agent), exactly the shared
# libraries it loads (per ldd, the dynamic loader at its absolute path included), the empty directories the agent
# mounts onto, and /dev/console. Deterministic: sorted entries, uid/gid 0, mtime 0, fixed inode numbers.
# Uncompressed by default (fastest to unpack in a slow guest); CAPSA_INITRD_COMPRESS=gzip gzips it (-n, so still
# deterministic; the kernel has CONFIG_RD_GZIP).
#
# usage: build-initrd.sh <init binary> [out]          (out defaults to build/guest/initrd.img in the repo)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
die() { echo "guest initrd: error: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 <init binary> [out]"
INIT_BIN="$(readlink -f "$1")"
OUT="${2:-$ROOT/build/guest/initrd.img}"
[[ -f $INIT_BIN && -x $INIT_BIN ]] || die "$1: not an executable file"
command -v cpio >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cpio >&2; }

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/capsa-initrd.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

# Directories the agent mounts onto (and the loader/library dirs, made as real directories, not usrmerge links).
for d in proc sys sys/fs/cgroup dev run tmp mnt; do mkdir -p "$STAGE/$d"; done
chmod 1777 "$STAGE/tmp"
mknod -m 600 "$STAGE/dev/console" c 5 1 || die "mknod /dev/console failed (need root)"

install -m 0755 "$INIT_BIN" "$STAGE/init"

# Shared libraries: every "=> /path" and every absolute-path line (the loader) from ldd; copied dereferenced to
# the path the loader looks them up under.
libs=()
if ldd_out="$(ldd "$INIT_BIN" 2>&1)"; then
  while read -r lib; do libs+=("$lib"); done < <(
    sed -nE 's@^\s*\S+\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)$@\1@p; s@^\s*(/\S+)\s+\(0x[0-9a-f]+\)$@\1@p' <<<"$ldd_out" | LC_ALL=C sort -u)
  grep -q "not found" <<<"$ldd_out" && die "unresolved libraries:"$'\n'"$ldd_out"
else
  # static binaries: "not a dynamic executable" / "statically linked"
  grep -qE "not a dynamic executable|statically linked" <<<"$ldd_out" || die "ldd failed: $ldd_out"
fi
for lib in "${libs[@]}"; do
  mkdir -p "$STAGE$(dirname "$lib")"
  cp -L "$lib" "$STAGE$lib"
  chmod 0755 "$STAGE$lib"
done

# Fixed metadata, then a sorted archive.
find "$STAGE" -mindepth 1 -exec touch -h -d @0 {} +
mkdir -p "$(dirname "$OUT")"
tmp_out="$OUT.tmp.$$"
(
  cd "$STAGE"
  find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio --quiet -o -H newc --reproducible -R 0:0 |
    if [[ ${CAPSA_INITRD_COMPRESS:-none} == gzip ]]; then gzip -9 -n; else cat; fi
) >"$tmp_out"
mv -f "$tmp_out" "$OUT"

echo "guest initrd: $OUT ($(stat -c %s "$OUT") bytes): /init=$INIT_BIN${libs[*]:+, libs: ${libs[*]}}" >&2
