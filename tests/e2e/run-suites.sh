#!/usr/bin/env bash
# Runs capsa's prebuilt end-to-end test binaries, one after another, with CAPSA_E2E=1 so the real-guest
# suites run. Meant to run inside the nested test host (`make e2e` does: tests/run-e2e.sh bash
# tests/e2e/run-suites.sh build/e2e-tests.list) or directly on a machine with hardware virtualisation.
#
#   run-suites.sh LIST [-- extra libtest args]
#
# LIST holds one test executable per line ('#' comments and blank lines ignored), as `make` writes it from
# `cargo test --no-run --message-format=json`. Tests inside one binary run one at a time: the guests share
# the host's CPUs and timeouts should not depend on how many boot at once (the multi-VM test boots its own
# VMs concurrently). Exit status: 0 when every binary passed, 1 otherwise, 2 on bad usage.
set -u

usage() { echo "usage: $0 LIST [-- libtest args...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
list=$1
shift
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] || usage
  shift
fi
[ -r "$list" ] || { echo "run-suites: cannot read test list $list" >&2; exit 2; }

export CAPSA_E2E=1
export RUST_BACKTRACE=${RUST_BACKTRACE:-0}
# Show the inputs the suites will use (they default under the workspace root; see docs/interfaces.md).
echo "run-suites: CAPSA_VMM=${CAPSA_VMM:-<default>} CAPSA_KERNEL=${CAPSA_KERNEL:-<default>} CAPSA_INITRD=${CAPSA_INITRD:-<default>}"
[ -e /dev/kvm ] || echo "run-suites: warning: no /dev/kvm here; the real-guest suites will fail" >&2

passed=()
failed=()
while IFS= read -r exe || [ -n "$exe" ]; do
  exe=${exe%%#*}
  exe=$(echo "$exe" | xargs)   # trim
  [ -n "$exe" ] || continue
  name=$(basename "$exe")
  if [ ! -x "$exe" ]; then
    echo "run-suites: $name: $exe is missing or not executable" >&2
    failed+=("$name (missing)")
    continue
  fi
  echo "=== run-suites: $name"
  start=$(date +%s%N)
  "$exe" --test-threads=1 "$@"
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  if [ "$rc" -eq 0 ]; then
    echo "=== run-suites: $name passed (${ms} ms)"
    passed+=("$name")
  else
    echo "=== run-suites: $name FAILED with status $rc (${ms} ms)"
    failed+=("$name (status $rc)")
  fi
done <"$list"

echo "=== run-suites: ${#passed[@]} passed, ${#failed[@]} failed"
for f in "${failed[@]+"${failed[@]}"}"; do
  echo "    FAILED: $f"
done
[ ${#failed[@]} -eq 0 ] && [ ${#passed[@]} -gt 0 ]
