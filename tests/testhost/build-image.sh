#!/usr/bin/env bash
# Builds (or finds in the cache) the nested test host's image: Debian's kernel, a small initramfs and an ext4
# root file system made with debootstrap. Prints the image directory on stdout (last line).
#
#   ${CAPSA_CACHE:-/var/cache/capsa}/testhost-<hash>/{kernel,initrd.img,root.img,kernel-release,complete}
#
# The hash covers this script, packages.txt, the init scripts in image/ and the kernel package's version, so a
# change to any of them builds a new image; a complete image is reused as is. The build runs in a temporary
# directory that is renamed into place at the end, so an interrupted build never leaves a half image behind.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CAPSA_CACHE:-/var/cache/capsa}
suite=${CAPSA_TESTHOST_SUITE:-bookworm}
mirror=${CAPSA_TESTHOST_MIRROR:-http://deb.debian.org/debian}

log() { echo "testhost-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The kernel: the package linux-image-amd64 currently depends on (e.g. linux-image-6.1.0-28-amd64 (= V)).
# One apt-cache call (it re-reads the package lists each time where apt keeps no pkgcache).
kernel_dep() {
  apt-cache show --no-all-versions linux-image-amd64 2>/dev/null \
    | sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n1
}
# The answer is remembered until apt's package lists change (apt-cache takes seconds on a loaded machine).
lists_sig=$(stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-16)
memo=$cache/.testhost-kernel-$lists_sig
kpkg= kver=
[ -f "$memo" ] && read -r kpkg kver <"$memo"
[ -n "$kpkg" ] || read -r kpkg kver < <(kernel_dep) || true
if [ -z "${kpkg:-}" ]; then
  log "apt lists have no linux-image-amd64; running apt-get update"
  apt-get update -qq >&2
  read -r kpkg kver < <(kernel_dep) || true
fi
[ -n "${kpkg:-}" ] && [ -n "${kver:-}" ] || die "cannot find the kernel package linux-image-amd64 depends on"
if [ ! -f "$memo" ] && mkdir -p "$cache" 2>/dev/null; then
  rm -f "$cache"/.testhost-kernel-*
  echo "$kpkg $kver" >"$memo.$$" && mv "$memo.$$" "$memo"
fi

packages=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages.txt" | tr -s ' \n' ' ' | xargs)
hash=$( { cat "$here/build-image.sh" "$here/packages.txt" "$here"/image/*; echo "$kpkg=$kver $suite $mirror"; } \
        | sha256sum | cut -c1-16)
dest=$cache/testhost-$hash
if [ -f "$dest/complete" ]; then
  touch "$dest/complete" 2>/dev/null || true   # last use, for pruning
  echo "$dest"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb debootstrap depmod mkfs.ext4 cpio gzip xz sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' is missing (run .ci/install-deps.sh)"
done
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

start=$(date +%s)
mkdir -p "$cache"
# One build at a time (a second runner waits, then finds the image complete).
exec 9>"$cache/.testhost.lock"
if ! flock -n 9; then
  log "waiting for another test-host image build"
  flock 9
fi
if [ -f "$dest/complete" ]; then
  echo "$dest"
  exit 0
fi
rm -rf "$cache"/.testhost-*.tmp.*   # left by a build that was killed (we hold the lock)
tmp=$(mktemp -d "$cache/.testhost-$hash.tmp.XXXXXX")
chmod 755 "$tmp"   # apt-get download drops privileges to _apt where it can
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log "building $dest (kernel $kpkg $kver; this takes several minutes)"

# 1. Kernel and modules.
( cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$kpkg=$kver" >&2 )
dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/deb"
krel=$(ls "$tmp/deb/lib/modules")
[ -n "$krel" ] && [ -f "$tmp/deb/boot/vmlinuz-$krel" ] || die "unexpected layout of $kpkg"
# QEMU boots an uncompressed vmlinux through its PVH entry (Debian has CONFIG_PVH=y), which skips the slow
# decompression under TCG (about 5 s); the bzImage is the fallback.
bz=$tmp/deb/boot/vmlinuz-$krel
xz_at=$(grep -abo $'\xfd7zXZ\x00' "$bz" | head -n1 | cut -d: -f1 || true)
# (xz stops after the stream and tail then dies of SIGPIPE: no pipefail there.)
if [ -n "$xz_at" ] && (set +o pipefail; tail -c +$((xz_at + 1)) "$bz" | xz -dc --single-stream >"$tmp/kernel.elf") \
   && [ "$(head -c 4 "$tmp/kernel.elf" | od -An -c | tr -d ' ')" = '177ELF' ]; then
  mv "$tmp/kernel.elf" "$tmp/kernel"
else
  log "cannot extract vmlinux from the bzImage; booting the bzImage"
  rm -f "$tmp/kernel.elf"
  cp "$bz" "$tmp/kernel"
fi
depmod -b "$tmp/deb" "$krel"   # the deb ships no modules.dep (made at install time)

# 2. Root file system. The debootstrap result is cached on its own (a tarball keyed by the package list,
#    suite and mirror), so a change to the init scripts only rebuilds the cheap steps below.
root=$tmp/rootfs
dbs_key=$( { cat "$here/packages.txt"; echo "minbase $suite $mirror v1"; } | sha256sum | cut -c1-16)
if command -v zstd >/dev/null; then
  ext=zst pack=(zstd -q -T0 -3) unpack=(zstd -q -d -c)
else
  ext=gz pack=(gzip -1) unpack=(gzip -d -c)
fi
dbs_tar=$cache/debootstrap-$dbs_key.tar.$ext
if [ ! -f "$dbs_tar" ]; then
  log "debootstrap $suite (minbase + $packages)"
  dbs_start=$(date +%s)
  debootstrap --variant=minbase --include="${packages// /,}" "$suite" "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -n 30 "$tmp/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
         "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
  tar -C "$root" --numeric-owner -cf - . | "${pack[@]}" >"$tmp/debootstrap.tar"
  mv "$tmp/debootstrap.tar" "$dbs_tar"
  log "debootstrap took $(( $(date +%s) - dbs_start )) s"
else
  log "reusing $dbs_tar"
  mkdir -p "$root"
  "${unpack[@]}" "$dbs_tar" | tar -C "$root" --numeric-owner -xf -
fi
mkdir -p "$root/lib/modules"
cp -a "$tmp/deb/lib/modules/$krel" "$root/lib/modules/"
depmod -b "$root" "$krel"
install -m 0755 "$here/image/testhost-init.sh" "$root/sbin/capsa-testhost-init"
# busybox applets the suites may want that Debian's userland lacks, as hard links (busybox-static).
for applet in nc; do
  [ -e "$root/usr/bin/$applet" ] || ln "$root/bin/busybox" "$root/usr/bin/$applet"
done
echo capsa-testhost >"$root/etc/hostname"
printf '127.0.0.1 localhost capsa-testhost\n::1 localhost\n' >"$root/etc/hosts"
: >"$root/etc/resolv.conf"
# Read-only root with a tmpfs overlay: nothing in the image changes at run time.
size_mib=$(( $(du -sm "$root" | cut -f1) * 115 / 100 + 64 ))
mkfs.ext4 -q -F -L capsa-testhost -O ^has_journal -E root_owner=0:0 -d "$root" "$tmp/root.img" "${size_mib}M" >/dev/null

# 3. Initramfs: busybox, the modules needed to mount the root disk, and image/initramfs-init.sh as /init.
ird=$tmp/initramfs
mkdir -p "$ird"/{bin,dev,proc,sys,mnt/lower,mnt/rw,newroot,modules}
cp "$root/bin/busybox" "$ird/bin/busybox"
for applet in sh mount umount mkdir insmod switch_root cat echo sleep poweroff; do
  ln -sf busybox "$ird/bin/$applet"
done
kroot=$tmp/deb/lib/modules/$krel
# Resolve each wanted module's dependencies from modules.dep, in load order; skip built-in ones.
resolve() {
  local name=$1 path line dep
  path=$(awk -F: -v n="/$name.ko" '{ i = index($1, n) } i > 0 && i == length($1) - length(n) + 1 {print $1; exit}' "$kroot/modules.dep")
  [ -n "$path" ] || return 0   # built in (or absent)
  line=$(grep "^$path:" "$kroot/modules.dep" | cut -d: -f2)
  for dep in $line; do resolve "$(basename "$dep" .ko)"; done
  echo "$path"
}
: >"$ird/modules/order"
for m in virtio_pci virtio_blk crc32c_generic crc32c-intel ext4 overlay; do
  for p in $(resolve "$m"); do
    grep -qx "$(basename "$p")" "$ird/modules/order" && continue
    cp "$kroot/$p" "$ird/modules/"
    basename "$p" >>"$ird/modules/order"
  done
done
install -m 0755 "$here/image/initramfs-init.sh" "$ird/init"
( cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1 ) >"$tmp/initrd.img"

echo "$krel" >"$tmp/kernel-release"
echo "$kpkg $kver" >"$tmp/kernel-package"
rm -rf "$tmp/deb" "$tmp/rootfs" "$tmp/initramfs" "$tmp"/*.deb
date +%s >"$tmp/complete"
mv -T "$tmp" "$dest" 2>/dev/null || { [ -f "$dest/complete" ] || die "cannot move $tmp to $dest"; }
trap - EXIT
rm -rf "$tmp"
# Prune images unused for an hour beyond the three most recently used, and all but the two newest
# debootstrap tarballs.
# shellcheck disable=SC2012
ls -t "$cache"/testhost-*/complete 2>/dev/null | tail -n +4 | while read -r old; do
  if [ -n "$(find "$old" -mmin +60)" ]; then rm -rf "$(dirname "$old")"; fi
done || true
# shellcheck disable=SC2012
ls -t "$cache"/debootstrap-*.tar.* 2>/dev/null | tail -n +3 | xargs -r rm -f || true
log "built $dest in $(( $(date +%s) - start )) s (root.img $(du -sh "$dest/root.img" | cut -f1))"
echo "$dest"
