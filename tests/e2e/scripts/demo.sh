#!/usr/bin/env bash
# `make demo`: capsa run on the busybox image (tests/e2e/scripts/busybox-oci.sh), printing from inside the
# microVM. Runs where guests can boot (make demo wraps it in tests/run-e2e.sh: the nested test host when this
# machine has no hardware virtualisation). CAPSA_BIN overrides the capsa binary (default target/release/capsa).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
capsa=${CAPSA_BIN:-$root/target/release/capsa}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash "$root/tests/e2e/scripts/busybox-oci.sh" "$work/busybox.tar" >/dev/null
echo "host kernel: $(uname -r)"
echo "\$ capsa run busybox.tar -- sh -c 'uname -r; head /proc/cpuinfo; ...'"
set +e
time "$capsa" run --vcpus 2 --memory 256 "$work/busybox.tar" -- sh -c '
  echo "guest kernel: $(uname -r)"
  head -n 10 /proc/cpuinfo
  echo "cpus: $(grep -c ^processor /proc/cpuinfo)  memory: $(grep MemTotal /proc/meminfo)"
  echo "pid 1 in the container: $(cat /proc/1/comm)"
  exit 7'
rc=$?
set -e
echo "capsa run exited with $rc (the container's exit 7)"
left=$(ls -A /run/capsa 2>/dev/null || true)
echo "left in /run/capsa: ${left:-nothing}"
[ "$rc" -eq 7 ] && [ -z "$left" ]
