#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through cargo-fuzz) of the two places
# network input reaches: protobuf-to-domain validation (`control`) and the
# call state machine (`machine`, arbitrary operation sequences with the
# invariants checked after each). Works on the stable toolchain with
# `--sanitizer none` (the Rust code is memory-safe; libFuzzer's coverage
# guidance and the panics on broken invariants are what find bugs).
#
#   scripts/fuzz.sh            # 60 s per target (what CI runs)
#   scripts/fuzz.sh 3600       # an hour per target
#   scripts/fuzz.sh 0 machine  # one target until stopped (Ctrl-C)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(control machine)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
  echo "fuzzing $t for ${seconds}s"
  if cargo fuzz run "$t" --sanitizer none -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units)' "$log" || true
  else
    tail -n 60 "$log"
    echo "fuzz target $t failed (the failing input is under fuzz/artifacts/$t/)" >&2
    exit 1
  fi
done
