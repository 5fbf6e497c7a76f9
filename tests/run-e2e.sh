#!/usr/bin/env bash
# Runs an end-to-end command (the arguments) where capsa's microVMs can boot:
# - directly on this machine when it has hardware virtualisation (a vmx/svm flag in /proc/cpuinfo and /dev/kvm);
# - otherwise inside the nested test host (tests/testhost/README.md), with the workspace at the same path.
# CAPSA_E2E_MODE=nested|direct forces either. CAPSA_E2E_TIMEOUT (seconds, default 3600) bounds a nested run;
# CAPSA_TESTHOST_ARGS adds runner options (e.g. "--memory 6144 --share /data"). CAPSA_E2E_HOST_RETRIES (default
# 0) reruns the whole command that many times in a fresh test host when the test host died or hung (status
# 125; see tests/testhost/README.md, "Known instability") or when the command itself found it unusable
# (status 75: a benchmark whose runs kept failing, tests/e2e/src/figures.rs): for commands that can simply
# start over, like benchmarks.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -eq 0 ]; then
  echo "usage: $0 CMD [ARGS...]" >&2
  exit 2
fi

mode=${CAPSA_E2E_MODE:-auto}
if [ "$mode" = auto ]; then
  if grep -qw -e vmx -e svm /proc/cpuinfo && [ -c /dev/kvm ]; then mode=direct; else mode=nested; fi
fi

case $mode in
  direct)
    echo "run-e2e: running directly on this machine: $*" >&2
    exec "$@"
    ;;
  nested)
    target=${CARGO_TARGET_DIR:-$root/target}
    testhost=${CAPSA_TESTHOST_BIN:-$target/release/capsa-testhost}
    if [ ! -x "$testhost" ]; then
      (cd "$root" && cargo build --release -q -p capsa-testhost)
    fi
    echo "run-e2e: no hardware virtualisation here: running inside the nested test host: $*" >&2
    retries=${CAPSA_E2E_HOST_RETRIES:-0}
    tries=0
    while :; do
      rc=0
      # shellcheck disable=SC2086 # CAPSA_TESTHOST_ARGS is a list of options
      "$testhost" run --timeout "${CAPSA_E2E_TIMEOUT:-3600}" ${CAPSA_TESTHOST_ARGS:-} -- "$@" || rc=$?
      if { [ "$rc" -eq 125 ] || [ "$rc" -eq 75 ]; } && [ "$tries" -lt "$retries" ]; then
        tries=$((tries + 1))
        if [ "$rc" -eq 125 ]; then why="the test host died or hung (status 125)"; else why="the command found the test host unusable (status 75: its runs kept failing)"; fi
        echo "run-e2e: $why; running the command again in a fresh one ($tries of $retries)" >&2
        continue
      fi
      exit "$rc"
    done
    ;;
  *)
    echo "run-e2e: CAPSA_E2E_MODE must be nested or direct (got '$mode')" >&2
    exit 2
    ;;
esac
