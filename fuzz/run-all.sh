#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS (default 45) each, starting from its corpus in the repo
# (fuzz/corpus/<target>/). Inputs found on the way go to a scratch corpus, so the committed one only changes
# by hand (`cargo +nightly fuzz cmin`, see README). A crash, a timeout or an out-of-memory fails the run and
# prints the reproducer's path (fuzz/artifacts/<target>/...) and the end of the target's log.
#
#   FUZZ_SECONDS=60 bash fuzz/run-all.sh            # every target
#   bash fuzz/run-all.sh vsock_tx desc_chain        # some
# Reproduce a crash: cargo +nightly fuzz run --dev -s none <target> fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-45}
# No sanitizer: the code under test is safe Rust (the unsafe is in vm-memory's checked volatile accesses);
# panics, failed assertions and overflow checks are what the targets report, and without ASan the cold build is
# shorter and the targets run about twice as fast. FUZZ_SANITIZER=address for a deeper local run.
san=${FUZZ_SANITIZER:-none}
# Dev profile (opt-level 0, debug assertions and overflow checks) with 16 codegen units instead of cargo-fuzz's
# optimised single-unit default: the cold build of the whole instrumented graph (the agent's libcontainer,
# tokio, oci-spec, protobuf...) is what CI's 2 cores spend most of this step on, and the targets are bound by
# syscalls (mmap, sockets, files) more than by optimised code. FUZZ_BUILD="-O" for an optimised build.
build_flags=(${FUZZ_BUILD:---dev --codegen-units 16})
# FUZZ_TARGET_DIR: build somewhere else than fuzz/target (e.g. to time a cold build).
fuzz() {
  local sub=$1
  shift
  cargo +nightly fuzz "$sub" "${build_flags[@]}" ${FUZZ_TARGET_DIR:+--target-dir "$FUZZ_TARGET_DIR"} "$@"
}

mapfile -t targets < <(if [ $# -gt 0 ]; then printf '%s\n' "$@"; else cargo +nightly fuzz list; fi)
start=$(date +%s)
if [ $# -gt 0 ]; then
  for t in "${targets[@]}"; do fuzz build -s "$san" "$t"; done
else
  fuzz build -s "$san"
fi
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The targets' sockets and disk images go there too.
export TMPDIR="$scratch/tmp"
mkdir -p "$TMPDIR"
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" "$scratch/$t"
  log="$scratch/$t.log"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: a guest must not make the host allocate GiBs.
  if fuzz run -s "$san" "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz: $t: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') runs in $secs s, no crash"
  else
    echo "fuzz: $t FAILED; the end of its log:" >&2
    tail -n 40 "$log" >&2
    repro=$(sed -n 's/.*Test unit written to //p' "$log" | tail -n 1)
    echo "fuzz: $t: reproducer ${repro:-not written (see the log above)}" >&2
    echo "fuzz: reproduce with: cargo +nightly fuzz run ${build_flags[*]} -s $san $t ${repro:-fuzz/artifacts/$t/<file>}" >&2
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets ran $secs s each without a crash in $(($(date +%s) - start)) s"
