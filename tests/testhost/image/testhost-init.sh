#!/bin/sh
# Stage-2 init (PID 1) of capsa's nested test host. Sets the host up for the end-to-end suites (KVM, vsock,
# networking, cgroups), mounts the shares the runner exports over virtio-9p at their host paths, runs the job
# the runner wrote (job.sh in the 9p share "capsajob") with stdout/stderr on the virtio-serial ports
# capsa.out/capsa.err, and reports on the port capsa.ctl: "started", then "exit <status>".
# Output ends with a per-run nonce on each stream so the runner knows it has everything.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
say() { echo "capsa-testhost: $*" >/dev/console; }
die() {
  say "error: $*"
  busybox poweroff -f
  sleep 10
}
opt9p=trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t mqueue mqueue /dev/mqueue
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +memory +pids +io +cpuset" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname capsa-testhost

# Devices and subsystems: what the runner needs first, then what the suites need.
for m in virtio_console 9pnet_virtio 9p virtio_rng; do
  modprobe -q "$m" || die "modprobe $m failed"
done
for m in kvm_amd vhost_vsock vhost_net tun overlay erofs loop fuse br_netfilter bridge veth nf_tables \
         nft_compat nft_chain_nat nf_nat nf_conntrack xt_conntrack xt_MASQUERADE xt_addrtype xt_comment \
         xt_mark xt_multiport iptable_nat iptable_filter ip6table_nat ip6table_filter sch_ingress cls_u32 \
         act_mirred; do
  modprobe -q "$m" 2>/dev/null || say "note: modprobe $m failed"
done
[ -c /dev/kvm ] || say "warning: no /dev/kvm (no nested SVM?)"
ip link set lo up
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 2>/dev/null

mkdir -p /run/capsa-job
mount -t 9p -o "$opt9p" capsajob /run/capsa-job || die "cannot mount the job share"
job=/run/capsa-job
# shares: "<mount tag> <absolute path>" per line, mounted at the same path as on the host.
while read -r tag path; do
  [ -n "$tag" ] || continue
  mkdir -p "$path" && mount -t 9p -o "$opt9p" "$tag" "$path" || die "cannot mount share $tag at $path"
done <"$job/shares"

port() {
  i=0
  while [ "$i" -lt 100 ]; do
    for p in /sys/class/virtio-ports/vport*; do
      [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
    done
    sleep 0.05
    i=$((i + 1))
  done
  return 1
}
out=$(port capsa.out) && err=$(port capsa.err) && ctl=$(port capsa.ctl) || die "virtio-serial ports missing"
nonce=$(cat "$job/nonce")
exec 3>"$out" 4>"$err" 5>"$ctl"
echo started >&5
sh "$job/job.sh" </dev/null >&3 2>&4 &
wait $!
rc=$?
# Stop whatever the job left running (daemons, VMs), flush, then report.
kill -KILL -1 2>/dev/null
sync
printf '%s' "$nonce" >&3
printf '%s' "$nonce" >&4
echo "exit $rc" >&5
# The runner stops QEMU once it has everything; power off in case it does not.
sleep 30
busybox poweroff -f
