#!/usr/bin/env bash
# Call records on against off, in alternating rounds on one machine: the
# figure behind the records' p99 target, which one run cannot show here (a
# run's p99 moves by a factor of two with the machine's noise). Each round
# runs `videocall-bench calls` at RATE calls/s with mixed outcomes, records
# on, then off (--no-records); with BEFORE=<dir of another build's
# binaries> it runs that build's records-on first in each round too. While
# each run goes it reads the business service's bytes written
# (/proc/<pid>/io) and its records writer thread's CPU
# (/proc/<pid>/task/<tid>/stat), and prints a line per run, then the p99
# gaps and CPU ratios against records off.
#
#   ./scripts/records-pairs.sh [rounds] [output-dir]     # 5 rounds by default
#   BEFORE=/path/to/old/release RATE=2000 CALLS=60000 ./scripts/records-pairs.sh 8
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-5}
out=${2:-target/bench/records-pairs-$(date -u +%Y%m%dT%H%M%SZ)}
rate=${RATE:-2000}
calls=${CALLS:-60000}
mkdir -p "$out"
ulimit -Sn "$(ulimit -Hn)"
cargo build --release --locked -p call-service -p business-service -p videocall-bench
now=$PWD/target/release

configs=()
[ -n "${BEFORE:-}" ] && configs+=("before:$BEFORE:")
configs+=("on:$now:" "off:$now:--no-records")

# One run; prints its line and appends it to summary.txt.
run() {
  local name=$1 dir=$2 extra=$3 round=$4 json="$out/$1-$4.json"
  # shellcheck disable=SC2086 # $extra is one flag or none
  "$dir/videocall-bench" calls --rate "$rate" --calls "$calls" --pairs 3000 \
    --reject 0.1 --cancel 0.05 --no-answer 0.02 --hold-ms 300 --quiet $extra \
    --json "$json" >"$out/$name-$round.log" 2>&1 &
  local bench=$! written=0 writer=0 pid v t
  # The last reading before the business service exits.
  while kill -0 "$bench" 2>/dev/null; do
    pid=$(pgrep -P "$bench" -f business-service | head -n 1 || true)
    if [ -n "$pid" ] && v=$(awk '/^write_bytes/ { print $2 }' "/proc/$pid/io" 2>/dev/null); then
      [ -n "$v" ] && written=$v
      for t in /proc/"$pid"/task/*; do
        if [ "$(cat "$t/comm" 2>/dev/null)" = call-records ]; then
          v=$(awk '{ print $14 + $15 }' "$t/stat" 2>/dev/null) && [ -n "$v" ] && writer=$v
        fi
      done
    fi
    sleep 0.5
  done
  wait "$bench"
  python3 - "$json" "$name" "$round" "$written" "$writer" "$(getconf CLK_TCK)" <<'PY' | tee -a "$out/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))["result"]
s, f = d["request_to_start"], d["finish_to_finished"]
p = dict(d["processes"])
n = d["completed"]
print(f'{sys.argv[3]} {sys.argv[2]:6} clean={d["clean"]} REQUEST→START p50={s["p50_ms"]:.2f} '
      f'p90={s["p90_ms"]:.2f} p99={s["p99_ms"]:.2f} ms | FINISH→both p99={f["p99_ms"]:.2f} ms | '
      f'CPU s: call={p["call-service"]["cpu_s"]:.2f} business={p["business-service"]["cpu_s"]:.2f} '
      f'generator={d["generator_cpu_s"]:.2f} | business wrote {int(sys.argv[4]) / n / 1024:.2f} KiB/call, '
      f'records writer {int(sys.argv[5]) / int(sys.argv[6]):.2f} CPU s')
PY
}

for round in $(seq "$rounds"); do
  for c in "${configs[@]}"; do
    IFS=: read -r name dir extra <<<"$c"
    run "$name" "$dir" "$extra" "$round"
  done
done

python3 - "$out/summary.txt" <<'PY' | tee "$out/gaps.txt"
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\d+) (\w+) .*p99=([\d.]+) ms \| FINISH.*business=([\d.]+)", line)
    runs[(int(m[1]), m[2])] = (float(m[3]), float(m[4]))
rounds = sorted({r for r, _ in runs})
for name in ("before", "on"):
    if (rounds[0], name) not in runs:
        continue
    gaps = [runs[(r, name)][0] - runs[(r, "off")][0] for r in rounds]
    cpu = [runs[(r, name)][1] / runs[(r, "off")][1] for r in rounds]
    print(f"{name}: p99 minus records off, per round: " + " ".join(f"{g:+.2f}" for g in gaps)
          + f" ms; median {statistics.median(gaps):+.2f} ms; within 1 ms in "
          f"{sum(g <= 1 for g in gaps)} of {len(gaps)}; business CPU {min(cpu):.2f}–{max(cpu):.2f}× records off")
PY
echo "written to $out"
