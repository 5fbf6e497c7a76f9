#!/usr/bin/env bash
# Runs each end-to-end test binary listed in LIST in a test-host session of its own (tests/run-e2e.sh), so one
# binary's trouble cannot hide the others' results.
#
# The nested environment itself is not stable (see ../shared/notes/environment.md):
# - the test host's own kernel (Debian 6.1 under QEMU TCG's emulated SVM) sometimes dies: a stack overflow in a
#   KVM vCPU thread, seen in containers_in_a_guest at a virtio-mmio InterruptACK exit. The runner reports it as
#   status 125; the binary then runs again in a fresh test host, up to five more times (in one CI trial
#   containers_in_a_guest needed three tries).
# - rarely a guest stops mid-run as if it had reset itself (capsa-bench saw 2 of 10 boots end that way under
#   load, with no guest console output). A binary whose tests fail is therefore run once more; a pass on
#   that second run is reported as FLAKY (in the summary and the final line), never silently.
#
#   run-each.sh LIST
set -u
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
list=${1:?usage: run-each.sh LIST}
[ -r "$list" ] || { echo "run-each: cannot read $list" >&2; exit 2; }
mkdir -p "$root/build"

passed=0
failed=0
failures=()
flaky=()
while IFS= read -r exe || [ -n "$exe" ]; do
  exe=${exe%%#*}
  exe=$(echo "$exe" | xargs)
  [ -n "$exe" ] || continue
  name=$(basename "$exe")
  one="$root/build/e2e-one-$name.list"
  echo "$exe" >"$one"
  host_deaths=0
  test_failures=0
  while :; do
    bash "$root/tests/run-e2e.sh" bash "$root/tests/e2e/run-suites.sh" "$one"
    rc=$?
    if [ "$rc" -eq 125 ] && [ "$host_deaths" -lt 5 ]; then
      host_deaths=$((host_deaths + 1))
      echo "=== run-each: $name: the test host died (status 125); running it again in a fresh test host"
      continue
    fi
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 125 ] && [ "$test_failures" -eq 0 ]; then
      test_failures=1
      echo "=== run-each: $name FAILED (status $rc); running it once more to tell a flaky guest from a bug"
      continue
    fi
    break
  done
  if [ "$rc" -eq 0 ] && [ "$test_failures" -gt 0 ]; then
    flaky+=("$name")
  fi
  rm -f "$one"
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failures+=("$name (status $rc)")
  fi
done <"$list"

for f in "${flaky[@]+"${flaky[@]}"}"; do
  echo "    FLAKY (failed once, passed on the second run): $f"
done
for f in "${failures[@]+"${failures[@]}"}"; do
  echo "    FAILED: $f"
done
echo "e2e: ${#flaky[@]} flaky"
echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
