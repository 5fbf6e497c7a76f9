#!/usr/bin/env bash
# Debian packages capsa's build and tests need on the host. Idempotent; quiet when everything is there.
set -euo pipefail
pkgs=(qemu-system-x86 debootstrap linux-source-6.1 flex bison bc libelf-dev libssl-dev protobuf-compiler
      busybox-static lz4 e2fsprogs erofs-utils libseccomp-dev libcap-ng-dev pkg-config zstd cpio xz-utils kmod iproute2 python3 make gcc)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# cargo-fuzz for `make fuzz` (the fuzz targets build with the nightly toolchain the machine has).
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "install-deps: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
