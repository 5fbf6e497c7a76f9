#!/usr/bin/env bash
# Runs each end-to-end test binary listed in LIST in a test-host session of its own (tests/run-e2e.sh), so one
# binary's trouble cannot hide the others' results.
#
# The nested environment itself is not stable (see tests/testhost/README.md, "Known instability"). Under
# QEMU TCG's emulated SVM, with Debian's 6.1 kernel as the test host:
# - the test host's own kernel sometimes dies (a stack overflow in a KVM vCPU thread, once with the guest's
#   user-space FS base loaded) or hangs (no heartbeat for 90 s); the runner reports either as status 125;
# - a guest sometimes triple-faults (the VMM logs "guest shutdown (triple fault?)" and exits) or stalls (RCU
#   stall messages on its console), during boot as well as under load, with QEMU 7.2 and 10.0 alike, with and
#   without huge pages, with 1 or 2 vCPUs.
# So every test runs on its own and a failing test runs again, up to CAPSA_E2E_ATTEMPTS (default 6) times in
# all (tests/e2e/run-suites.sh); a pass after a failure is reported as FLAKY in the summary, never silently.
# When the test host dies, a fresh one carries on with the tests not passed yet, up to five times per binary.
#
#   run-each.sh LIST
set -u
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
list=${1:?usage: run-each.sh LIST}
[ -r "$list" ] || { echo "run-each: cannot read $list" >&2; exit 2; }
mkdir -p "$root/build"
export CAPSA_E2E_ATTEMPTS=${CAPSA_E2E_ATTEMPTS:-6}
export CAPSA_E2E_FLAKY="$root/build/e2e-flaky.txt"
: >"$CAPSA_E2E_FLAKY"

passed=0
failed=0
failures=()
while IFS= read -r exe || [ -n "$exe" ]; do
  exe=${exe%%#*}
  exe=$(echo "$exe" | xargs)
  [ -n "$exe" ] || continue
  name=$(basename "$exe")
  one="$root/build/e2e-one-$name.list"
  echo "$exe" >"$one"
  export CAPSA_E2E_DONE="$root/build/e2e-done-$name.txt"
  : >"$CAPSA_E2E_DONE"
  host_deaths=0
  while :; do
    bash "$root/tests/run-e2e.sh" bash "$root/tests/e2e/run-suites.sh" "$one"
    rc=$?
    if [ "$rc" -eq 125 ] && [ "$host_deaths" -lt 5 ]; then
      host_deaths=$((host_deaths + 1))
      echo "=== run-each: $name: the test host died (status 125); a fresh test host runs the tests not passed yet"
      continue
    fi
    break
  done
  rm -f "$one" "$CAPSA_E2E_DONE"
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failures+=("$name (status $rc)")
  fi
done <"$list"

nflaky=0
while IFS= read -r f; do
  [ -n "$f" ] || continue
  echo "    FLAKY (failed, then passed on a rerun): $f"
  nflaky=$((nflaky + 1))
done <"$CAPSA_E2E_FLAKY"
for f in "${failures[@]+"${failures[@]}"}"; do
  echo "    FAILED: $f"
done
echo "e2e: $nflaky flaky"
echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
