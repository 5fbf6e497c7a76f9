#!/usr/bin/env bash
# Runs capsa's prebuilt end-to-end test binaries, one after another, with CAPSA_E2E=1 so the real-guest
# suites run. Meant to run inside the nested test host (`make e2e` does: tests/run-e2e.sh bash
# tests/e2e/run-suites.sh build/e2e-tests.list) or directly on a machine with hardware virtualisation.
#
#   run-suites.sh LIST [-- extra libtest args]
#
# LIST holds one test executable per line ('#' comments and blank lines ignored), as `make` writes it from
# `cargo test --no-run --message-format=json`. Each test of each binary runs on its own (`--exact`), one at a
# time: the guests share the host's CPUs and timeouts should not depend on how many boot at once (the multi-VM
# test boots its own VMs concurrently).
#
# The nested test host is not stable (tests/e2e/run-each.sh says how), so:
# - CAPSA_E2E_ATTEMPTS (default 1): how many times a failing test is run; a pass after a failure is reported
#   as FLAKY, never silently, and appended to the file CAPSA_E2E_FLAKY names (if set).
# - CAPSA_E2E_DONE: a file of "binary::test" lines; tests listed there passed in an earlier test host and are
#   skipped, tests that pass here are appended (run-each.sh uses it to resume after the test host died).
#
# Exit status: 0 when every test passed, 1 otherwise, 2 on bad usage.
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
attempts=${CAPSA_E2E_ATTEMPTS:-1}
done_file=${CAPSA_E2E_DONE:-}
flaky_file=${CAPSA_E2E_FLAKY:-}

export CAPSA_E2E=1
export RUST_BACKTRACE=${RUST_BACKTRACE:-0}
# Show the inputs the suites will use (they default under the workspace root; see docs/interfaces.md).
echo "run-suites: CAPSA_VMM=${CAPSA_VMM:-<default>} CAPSA_KERNEL=${CAPSA_KERNEL:-<default>} CAPSA_INITRD=${CAPSA_INITRD:-<default>}"
[ -e /dev/kvm ] || echo "run-suites: warning: no /dev/kvm here; the real-guest suites will fail" >&2

passed=()
failed=()
flaky=()
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
  tests=()
  while IFS= read -r t; do tests+=("$t"); done < <("$exe" --list 2>/dev/null | sed -n 's/: test$//p')
  if [ ${#tests[@]} -eq 0 ]; then
    echo "run-suites: $name lists no tests" >&2
    failed+=("$name (no tests)")
    continue
  fi
  for t in "${tests[@]}"; do
    key="$name::$t"
    if [ -n "$done_file" ] && grep -qxF -- "$key" "$done_file" 2>/dev/null; then
      echo "=== run-suites: $key passed in an earlier test host"
      passed+=("$key")
      continue
    fi
    try=1
    while :; do
      echo "=== run-suites: $key (attempt $try of $attempts)"
      start=$(date +%s%N)
      "$exe" --exact "$t" --test-threads=1 "$@"
      rc=$?
      ms=$(( ($(date +%s%N) - start) / 1000000 ))
      if [ "$rc" -eq 0 ]; then
        echo "=== run-suites: $key passed (${ms} ms)"
        passed+=("$key")
        [ -n "$done_file" ] && echo "$key" >>"$done_file"
        if [ "$try" -gt 1 ]; then
          flaky+=("$key (passed on attempt $try)")
          [ -n "$flaky_file" ] && echo "$key (passed on attempt $try)" >>"$flaky_file"
        fi
        break
      fi
      echo "=== run-suites: $key FAILED with status $rc (${ms} ms)"
      if [ "$try" -ge "$attempts" ]; then
        failed+=("$key (status $rc)")
        break
      fi
      try=$((try + 1))
    done
  done
done <"$list"

echo "=== run-suites: ${#passed[@]} passed, ${#failed[@]} failed, ${#flaky[@]} flaky"
for f in "${flaky[@]+"${flaky[@]}"}"; do
  echo "    FLAKY: $f"
done
for f in "${failed[@]+"${failed[@]}"}"; do
  echo "    FAILED: $f"
done
[ ${#failed[@]} -eq 0 ] && [ ${#passed[@]} -gt 0 ]
