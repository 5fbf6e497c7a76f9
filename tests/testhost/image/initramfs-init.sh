#!/bin/sh
# /init of the test host's initramfs (busybox): load the modules the root disk needs, mount the root image
# read-only under a tmpfs overlay (the cached image is never written), and hand over to the stage-2 init.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
  echo "capsa-testhost: initramfs: $*" >/dev/console
  poweroff -f
  sleep 10
}
while read -r m; do
  insmod "/modules/$m" 2>/dev/null || echo "capsa-testhost: initramfs: insmod $m failed" >/dev/console
done </modules/order
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
[ -b /dev/vda ] || fail "no root disk /dev/vda"
mount -t ext4 -o ro /dev/vda /mnt/lower || fail "cannot mount the root disk /dev/vda"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "cannot mount the tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot \
  || fail "cannot mount the overlay root"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/capsa-testhost-init
fail "switch_root failed"
