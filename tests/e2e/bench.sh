#!/usr/bin/env bash
# `make bench`: runs every benchmark, each in a test-host session of its own (tests/run-e2e.sh), keeps what
# they print in build/bench.log, and fails when a figure is missing or cannot be trusted.
#
# Every figure is a line `BENCH <name>=<value> ok=<n>/<N>` (tests/e2e/src/figures.rs). A benchmark whose runs
# keep failing (three in a row), or one of whose figures rests on fewer than 80 % of its runs, exits with
# status 75; so does the containers step when its test fails. tests/run-e2e.sh then runs that benchmark again
# in a fresh test host, up to CAPSA_E2E_HOST_RETRIES times (default here 2; also for a test host that died,
# status 125). At the end capsa-bench-check reads the log: a missing figure, a figure without a value or one
# from fewer than 80 % of its runs fails `make bench`, and so does a benchmark that failed for good.
#
#   bench.sh E2E_LIST        (E2E_LIST: the test binaries `make` lists, build/e2e-tests.list)
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
list=${1:?usage: bench.sh E2E_LIST}
target=${CARGO_TARGET_DIR:-$root/target}
log=$root/build/bench.log
mkdir -p "$root/build"
: >"$log"
export CAPSA_E2E_HOST_RETRIES=${CAPSA_E2E_HOST_RETRIES:-2}

failed=()
step() {
  local name=$1
  shift
  echo "=== bench: $name" | tee -a "$log"
  bash "$root/tests/run-e2e.sh" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "=== bench: $name FAILED (status $rc)" | tee -a "$log"
    failed+=("$name (status $rc)")
  fi
}

containers=$(grep /containers- "$list" | head -n 1)
[ -n "$containers" ] || { echo "bench: no containers suite in $list" >&2; exit 2; }

step boot "$target/release/capsa-bench"
# The containers suite prints its figures from two tests; the test's own status decides (PIPESTATUS), not
# grep's, and a failed test asks for a fresh test host (75).
step containers bash -c '
  CAPSA_E2E=1 "$1" --nocapture --test-threads=1 containers_processes containers_stdout_100mib 2>&1 |
    grep -E "^BENCH|test result|panicked|FAILED"
  st=${PIPESTATUS[0]}
  [ "$st" -eq 0 ] || { echo "bench: the containers tests failed (status $st)"; exit 75; }' bash "$containers"
step cri "$target/release/capsa-cri-bench"

echo "=== bench: checking the figures"
"$target/release/capsa-bench-check" "$log" \
  boot_capsa_ms boot_qemu_ms boot_capsa_qemu_ratio vmm_own_memory_capsa_mib \
  jail_seccomp_on_off_ratio jail_only_on_off_ratio seccomp_only_on_off_ratio \
  start_to_ready_js_ms start_to_ready_jns_ms start_to_ready_njs_ms start_to_ready_njns_ms \
  container_start_to_first_stdout_byte_ms exec_latency_ms stdout_throughput_mib_s \
  pod_ready_capsa_ms pod_ready_runc_ms pod_ready_ratio first_log_capsa_ms first_log_runc_ms first_log_ratio \
  timeline_capsa_vmm_spawned_ms timeline_capsa_agent_ready_ms timeline_capsa_sandbox_created_ms \
  timeline_capsa_container_started_ms timeline_capsa_cri_first_log_ms timeline_runc_cri_first_log_ms \
  pod_pss_capsa_mib net_host_to_pod_ratio net_pod_to_host_ratio net_rtt_median_ratio net_rtt_p90_ratio
check=$?
for f in "${failed[@]+"${failed[@]}"}"; do
  echo "bench: FAILED: $f"
done
[ "$check" -eq 0 ] && [ ${#failed[@]} -eq 0 ]
