#!/usr/bin/env bash
# Build capsa's guest kernel (Debian linux-source-6.1, `make tinyconfig` + kernel/capsa.config) and place it at
# build/guest/{vmlinux,bzImage,kernel.config}. The result is cached under
# ${CAPSA_CACHE:-/var/cache/capsa}/guest-kernel-<hash>/, hash = sha256(source package version, fragment, this
# script). Works from any cwd. Env: CAPSA_CACHE, JOBS (default nproc), CAPSA_KEEP_KSRC=1 keeps the build tree.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
FRAGMENT="$HERE/kernel/capsa.config"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
CACHE="${CAPSA_CACHE:-/var/cache/capsa}"
OUT="$ROOT/build/guest"
SRC_PKG=linux-source-6.1
SRC_TAR=/usr/src/linux-source-6.1.tar.xz
JOBS="${JOBS:-$(nproc)}"

log() { echo "guest kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- build dependencies -------------------------------------------------------------------------------------
deps=(linux-source-6.1 flex bison bc libelf-dev libssl-dev lz4 make gcc xz-utils)
missing=()
for p in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing missing build dependencies: ${missing[*]}"
  [[ $(id -u) == 0 ]] || die "need root to apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
fi
[[ -f $SRC_TAR ]] || die "$SRC_TAR missing"

# --- cache key ----------------------------------------------------------------------------------------------
SRC_VER="$(dpkg-query -W -f='${Version}' "$SRC_PKG")"
HASH="$( { printf '%s\n' "$SRC_VER"; sha256sum <"$FRAGMENT"; sha256sum <"$SELF"; } | sha256sum | cut -c1-16)"
ENTRY="$CACHE/guest-kernel-$HASH"

complete() { [[ -s $1/vmlinux && -s $1/bzImage && -s $1/config ]]; }

mkdir -p "$CACHE"
# One builder at a time per cache (a second `make` waits and then finds the entry cached).
exec 9>"$CACHE/.guest-kernel.lock"
flock 9

if complete "$ENTRY"; then
  log "cached $ENTRY"
else
  start=$(date +%s)
  STAGE="$(mktemp -d "$CACHE/.guest-kernel-$HASH.tmp.XXXXXX")"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/capsa-ksrc.XXXXXX")"
  cleanup() {
    rm -rf "$STAGE"
    exec 9>&- # release the cache lock before the (slow) removal of the source tree
    if [[ ${CAPSA_KEEP_KSRC:-0} == 1 ]]; then log "kept build tree $WORK"; else rm -rf "$WORK"; fi
  }
  trap cleanup EXIT
  log "building $SRC_PKG $SRC_VER (fragment $FRAGMENT) in $WORK, -j$JOBS"
  tar -xf "$SRC_TAR" -C "$WORK" --strip-components=1
  cd "$WORK"
  export KBUILD_BUILD_USER=capsa KBUILD_BUILD_HOST=capsa KBUILD_BUILD_TIMESTAMP="$(date -u -R -r "$SRC_TAR")"
  make -s ARCH=x86_64 tinyconfig >/dev/null
  # -m: merge only; olddefconfig then resolves dependencies (the check below replaces merge_config's own
  # report, which also lists every tinyconfig line the fragment changed).
  ARCH=x86_64 scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >merge.log 2>&1 ||
    { cat merge.log >&2; die "merge_config.sh failed"; }
  make -s ARCH=x86_64 olddefconfig >>merge.log 2>&1 || { cat merge.log >&2; die "olddefconfig failed"; }

  # Every option the fragment asks for must be in the final .config as asked (merge_config drops options whose
  # dependencies are missing).
  bad=0
  while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
      grep -qxF -- "$line" .config || { log "requested '$line', got '$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" .config || echo absent)'"; bad=1; }
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
      ! grep -qE "^${BASH_REMATCH[1]}=" .config || { log "requested '$line', got '$(grep -E "^${BASH_REMATCH[1]}=" .config)'"; bad=1; }
    fi
  done <"$FRAGMENT"
  ((bad == 0)) || die "final .config does not match the fragment (see above)"

  make -s ARCH=x86_64 -j"$JOBS" vmlinux bzImage
  cp vmlinux "$STAGE/vmlinux"
  cp arch/x86/boot/bzImage "$STAGE/bzImage"
  cp .config "$STAGE/config"
  printf 'source=%s %s\nfragment_sha256=%s\nbuilt=%s\nbuild_seconds=%s\n' "$SRC_PKG" "$SRC_VER" \
    "$(sha256sum <"$FRAGMENT" | cut -d' ' -f1)" "$(date -u +%FT%TZ)" "$(($(date +%s) - start))" >"$STAGE/BUILD-INFO"
  chmod 0755 "$STAGE"
  cd /
  rm -rf "$ENTRY" # an incomplete leftover (cannot happen through rename, but be safe)
  mv -T "$STAGE" "$ENTRY"
  log "built $ENTRY in $(($(date +%s) - start)) s"
fi
flock -u 9

# --- publish into build/guest (copies, so the files also work where only the workspace is mounted) ----------
mkdir -p "$OUT"
for f in vmlinux bzImage config; do
  dst="$OUT/$f"; [[ $f == config ]] && dst="$OUT/kernel.config"
  if ! cmp -s "$ENTRY/$f" "$dst" 2>/dev/null; then
    cp "$ENTRY/$f" "$dst.tmp.$$" && mv -f "$dst.tmp.$$" "$dst"
  fi
done
log "$OUT/vmlinux ($(stat -c %s "$OUT/vmlinux") bytes), $OUT/bzImage ($(stat -c %s "$OUT/bzImage") bytes)"
