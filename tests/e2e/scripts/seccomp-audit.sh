#!/usr/bin/env bash
# Runs capsa-vmm with its seccomp filters in LOG mode on a real guest and prints the kernel's seccomp audit
# lines (type=1326: a syscall outside a thread's filter, with comm= naming the thread and syscall= its number).
# For finding what a filter lacks after a change to the VMM or its dependencies. Runs where guests boot:
#   bash tests/run-e2e.sh bash tests/e2e/scripts/seccomp-audit.sh
# The guest exercises virtio-fs (rootfs and file I/O), vsock (the agent's connections, stdio), blk-free boot,
# rng, the console and a clean shutdown. Exit status 0 when no audit line appeared.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
capsa=${CAPSA_BIN:-$root/target/release/capsa}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash "$root/tests/e2e/scripts/busybox-oci.sh" "$work/busybox.tar" >/dev/null
cat > "$work/capsa.toml" <<TOML
[hypervisor]
path = "$root/target/release/capsa-vmm"
kernel = "$root/build/guest/vmlinux"
initrd = "$root/build/guest/initrd.img"
virtiofsd = "$root/build/virtiofsd"
seccomp = "${CAPSA_SECCOMP_MODE:-log}"
[runtime]
state_dir = "$work/run"
TOML
dmesg -C 2>/dev/null || true
set +e
"$capsa" run --config "$work/capsa.toml" --vcpus 2 --memory 256 "$work/busybox.tar" -- sh -c '
  dd if=/dev/urandom of=/tmp/x bs=1k count=256 2>/dev/null && sync && md5sum /tmp/x >/dev/null
  for i in $(seq 1 200); do echo "line $i"; done | tail -n 1
  ls / >/dev/null; cat /proc/cpuinfo >/dev/null; echo done; exit 3'
rc=$?
set -e
echo "capsa run exited with $rc (expected 3)"
lines=$(dmesg 2>/dev/null | grep -E 'type=1326|seccomp' || true)
if [ -n "$lines" ]; then
  echo "seccomp audit lines:"
  echo "$lines"
else
  echo "no seccomp audit lines"
fi
[ "$rc" -eq 3 ] && [ -z "$lines" ]
