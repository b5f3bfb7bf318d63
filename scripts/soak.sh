#!/usr/bin/env bash
# A soak as production runs it: the call service and the business service
# with call records (SQLite) for DURATION at RATE calls/s with mixed outcomes;
# memory of both services over time (soak.png) and every call record counted
# and checked complete at the end (exit 1 if not).
#
#   ./scripts/soak.sh [output-dir]         # RATE=1000 DURATION=10m by default
#   RATE=2500 DURATION=10m ./scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-target/bench/soak-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
rate=${RATE:-1000}
duration=${DURATION:-10m}
venv=target/benchenv
if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check matplotlib
fi
ulimit -Sn "$(ulimit -Hn)"
cargo build --release --locked -p call-service -p business-service -p videocall-bench
target/release/videocall-bench soak --rate "$rate" --duration "$duration" --pairs 3000 \
  --reject 0.1 --cancel 0.05 --no-answer 0.02 --hold-ms 300 --quiet \
  --json "$out/soak.json" --markdown "$out/soak.md"
"$venv/bin/python" bench/soak_plot.py "$out/soak.json" "$out/soak.png"
echo "soak report: $out/soak.md, plot: $out/soak.png"
