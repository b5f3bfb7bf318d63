#!/usr/bin/env bash
# Profiles the call path, two ways:
#   1. flame graphs (perf, sampled on CPU time, DWARF call stacks) of the call
#      service, the business service and the load generator while
#      `videocall-bench calls` runs at RATE calls/s;
#   2. the call service's instructions per call (valgrind's callgrind, which
#      counts instructions rather than time: the figure repeats within about
#      1 % whatever else the machine does, so it is the one to compare before
#      and after a change). Two runs of 300 and 900 calls; their difference
#      over 600 calls leaves start-up and shutdown out. Then the business
#      service's, with call records and without, the same way.
# Installs what it needs: linux-perf and valgrind (Debian), inferno
# (crates.io, into target/tools) for the SVGs. Writes to the output
# directory (default target/profile/<date-time>); extra arguments go to the
# call service (e.g. --notice-linger=0s), in both parts.
#
#   ./scripts/profile.sh [output-dir] [-- call-service args...]
#   RATE=3000 DURATION=5 ./scripts/profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/profile/$(date -u +%Y%m%dT%H%M%SZ)
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
  out=$1
  shift
fi
[ "${1:-}" = "--" ] && shift
call_args=()
for a in "$@"; do call_args+=("--call-arg=$a"); done
rate=${RATE:-3000}
duration=${DURATION:-5}
mkdir -p "$out"
out=$(cd "$out" && pwd)

missing=()
command -v perf >/dev/null || missing+=(linux-perf)
command -v valgrind >/dev/null || missing+=(valgrind)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
tools=$PWD/target/tools/bin
if [ ! -x "$tools/inferno-flamegraph" ]; then
  cargo install --locked --quiet --root target/tools inferno
fi
cargo build --release --locked -p call-service -p business-service -p videocall-bench
bench=$PWD/target/release/videocall-bench
ulimit -Sn "$(ulimit -Hn)"

echo "== flame graphs at $rate calls/s"
"$bench" calls --rate "$rate" --calls $((rate * (duration + 4))) --pairs 5000 "${call_args[@]}" \
  --markdown "$out/load.md" >/dev/null 2>"$out/load.log" &
load=$!
# The load has run for two seconds once its progress says so.
for _ in $(seq 600); do
  grep -q '^\[  2\.' "$out/load.log" && break
  kill -0 "$load" 2>/dev/null || { cat "$out/load.log"; exit 1; }
  sleep 0.1
done
cs=$(pgrep -P "$load" -x call-service)
bs=$(pgrep -P "$load" -f business-service)
recorders=()
for who in "call-service:$cs" "business-service:$bs" "load-generator:$load"; do
  name=${who%%:*}
  perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -o "$out/$name.perf" -p "${who#*:}" \
    -- sleep "$duration" >/dev/null 2>&1 &
  recorders+=($!)
done
wait "${recorders[@]}"
wait "$load"
for name in call-service business-service load-generator; do
  perf script -i "$out/$name.perf" 2>/dev/null | "$tools/inferno-collapse-perf" >"$out/$name.folded"
  # Frames narrower than 2 pixels left out: a tenth of the size.
  "$tools/inferno-flamegraph" --minwidth 2 --title "$name at $rate calls/s (CPU time sampled for $duration s)" \
    <"$out/$name.folded" >"$out/$name.svg"
  rm "$out/$name.perf"
done

echo "== instructions per call (callgrind)"
cat >"$out/callgrind.sh" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$out/callgrind.%p.out $PWD/target/release/call-service "\$@"
EOF
chmod +x "$out/callgrind.sh"
total() {
  "$bench" calls --rate 50 --calls "$1" --pairs 50 --quiet --require-clean "${call_args[@]}" \
    --call-service "$out/callgrind.sh" >/dev/null 2>>"$out/callgrind.log"
  local f
  f=$(ls -t "$out"/callgrind.*.out | head -n 1)
  mv "$f" "$out/callgrind-$1.out"
  awk '/^summary:/ { print $2 }' "$out/callgrind-$1.out"
}
small=$(total 300)
large=$(total 900)
per_call=$(((large - small) / 600))

# The business service the same way, with its call records (SQLite) and
# without, mixed outcomes: what a record costs in instructions.
cat >"$out/callgrind-business.sh" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$out/callgrind-business.%p.out $PWD/target/release/business-service "\$@"
EOF
chmod +x "$out/callgrind-business.sh"
business_total() {
  local name=$1 n=$2
  shift 2
  "$bench" calls --rate 50 --calls "$n" --pairs 50 --quiet --require-clean --reject 0.1 --cancel 0.05 --no-answer 0.02 \
    --business-service "$out/callgrind-business.sh" "$@" >/dev/null 2>>"$out/callgrind.log"
  local f
  f=$(ls -t "$out"/callgrind-business.*.out | head -n 1)
  mv "$f" "$out/callgrind-business-$name-$n.out"
  awk '/^summary:/ { print $2 }' "$out/callgrind-business-$name-$n.out"
}
records_small=$(business_total records 300)
records_large=$(business_total records 900)
business_records=$(((records_large - records_small) / 600))
plain_small=$(business_total no-records 300 --no-records)
plain_large=$(business_total no-records 900 --no-records)
business_plain=$(((plain_large - plain_small) / 600))
{
  echo "# Profile"
  echo
  echo "Call service, instructions per call (callgrind; 900 calls minus 300 calls, over 600): **$per_call**"
  echo "(totals: $small for 300 calls, $large for 900)."
  echo
  echo "Business service, instructions per call, mixed outcomes (the same way): **$business_records** with call records,"
  echo "**$business_plain** without (--no-records)."
  echo
  echo "Flame graphs at $rate calls/s, CPU time sampled for $duration s: call-service.svg, business-service.svg, load-generator.svg."
  echo "Call service arguments: ${*:-(defaults)}."
  echo
  echo "The load while it was sampled (perf with DWARF stacks costs CPU: not a latency figure):"
  echo
  cat "$out/load.md"
} >"$out/PROFILE.md"
echo "instructions per call: call service $per_call; business service $business_records with records, $business_plain without"
echo "written to $out"
