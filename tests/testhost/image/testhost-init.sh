#!/bin/sh
# Stage-2 init (PID 1) of capsa's nested test host. Sets the host up for the end-to-end suites (KVM, vsock,
# networking, cgroups), mounts the shares the runner exports over virtio-9p at their host paths, runs the job
# the runner wrote (job.sh in the 9p share "capsajob") with stdout/stderr on the virtio-serial ports
# capsa.out/capsa.err, and reports on the port capsa.ctl: "started", "alive" every 5 s, then "exit <status>".
# Output ends with a per-run nonce on each stream so the runner knows it has everything.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
say() { echo "capsa-testhost: $*" >/dev/console; }
die() {
  say "error: $*"
  /bin/busybox poweroff -f
  /bin/busybox sleep 10
}
opt9p=trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client

# busybox (static) for the small steps: every dynamically linked exec costs under TCG.
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
# Devices and subsystems the suites need load in the background while the shares are mounted.
modprobe -q -a kvm_amd vhost_vsock vhost_net tun overlay erofs loop fuse br_netfilter bridge veth nf_tables \
  nft_compat nft_chain_nat nf_nat nf_conntrack xt_conntrack xt_MASQUERADE xt_addrtype xt_comment xt_mark \
  xt_multiport iptable_nat iptable_filter ip6table_nat ip6table_filter sch_ingress cls_u32 act_mirred \
  2>/dev/null &
suite_modules=$!
modprobe -a virtio_console 9pnet_virtio 9p virtio_rng || die "modprobe of the runner's modules failed"
$bb mkdir -p /dev/pts /dev/shm /dev/mqueue
$bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$bb mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$bb mount -t mqueue mqueue /dev/mqueue
$bb mount -t tmpfs -o mode=0755 tmpfs /run
$bb mount -t tmpfs -o mode=1777 tmpfs /tmp
$bb mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +memory +pids +io +cpuset" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
$bb ln -sf /proc/self/fd /dev/fd
$bb ln -sf /proc/self/fd/0 /dev/stdin
$bb ln -sf /proc/self/fd/1 /dev/stdout
$bb ln -sf /proc/self/fd/2 /dev/stderr
$bb hostname capsa-testhost
$bb ip link set lo up

$bb mkdir -p /run/capsa-job
$bb mount -t 9p -o "$opt9p" capsajob /run/capsa-job || die "cannot mount the job share"
job=/run/capsa-job
# shares: "<mount tag> <ro|rw> <absolute path>" per line, mounted at the same path as on the host.
while read -r tag mode path; do
  [ -n "$tag" ] || continue
  $bb mkdir -p "$path" && $bb mount -t 9p -o "$opt9p,$mode" "$tag" "$path" || die "cannot mount share $tag at $path"
done <"$job/shares"

port() {
  i=0
  while [ "$i" -lt 100 ]; do
    for p in /sys/class/virtio-ports/vport*; do
      name=
      read -r name <"$p/name" 2>/dev/null
      [ "$name" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
    done
    $bb sleep 0.05
    i=$((i + 1))
  done
  return 1
}
out=$(port capsa.out) && err=$(port capsa.err) && ctl=$(port capsa.ctl) || die "virtio-serial ports missing"
read -r nonce <"$job/nonce"
wait "$suite_modules"
[ -c /dev/kvm ] || say "warning: no /dev/kvm (is nested SVM missing?)"
echo 1 >/proc/sys/net/ipv4/ip_forward
echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null
exec 3>"$out" 4>"$err" 5>"$ctl"
echo started >&5
# Heartbeat: the runner treats a test host that stops sending these as hung and gives up on it early (its
# kernel has been seen to stop taking timer interrupts while a nested guest runs, with no console output).
(while :; do $bb sleep 5; echo alive >&5; done) &
sh "$job/job.sh" </dev/null >&3 2>&4 &
wait $!
rc=$?
# Stop whatever the job left running (daemons, VMs), flush, then report.
kill -KILL -1 2>/dev/null
$bb sync
printf '%s' "$nonce" >&3
printf '%s' "$nonce" >&4
echo "exit $rc" >&5
# The runner stops QEMU once it has everything; power off in case it does not.
$bb sleep 30
$bb poweroff -f
