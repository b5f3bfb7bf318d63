#!/usr/bin/env bash
# The full benchmark, side by side on this machine in one run:
#   (a) Kamailio as a stateful proxy (tm, record-route; with and without
#       dialog tracking) between a SIPp UAC and UAS: highest clean call rate;
#   (b) a minimal tonic echo service (unary and bidirectional): the transport;
#   (c) the call service with an approving business service: highest clean
#       full-call rate (each device its own connection, then devices sharing
#       8 connections), latency at half of it, memory per idle client
#       (each its own connection, as many as file descriptors allow; then
#       100,000 whose streams share 64 connections).
#   and, as a floor under (c), the same clients and calls through a relay
#   that keeps no call state (`videocall-bench ramp --floor`);
#   (d) the business service keeps call records (SQLite) throughout, as in
#       production; side by side, the ramp and 2,000 calls/s without them
#       (--no-records), and a soak at half the highest clean rate (10 min,
#       records on, mixed outcomes: memory over time, every record complete);
#   (e) the call state three ways: one node in memory (the ramp of (c)), one
#       node on Redis, three nodes on one Redis (each call's caller and
#       callee on different nodes): highest clean rate, 1,000 calls/s
#       side by side (latency, Redis round trips, commands and CPU per call),
#       and the idle clients of (c) over 64 shared connections on one node on
#       Redis and spread over the three nodes (Redis's memory per client too).
# Installs what it needs (Debian: kamailio, sip-tester; PyPI: matplotlib in
# target/benchenv), builds in release mode, and writes JSON, REPORT.md and
# PNG plots to the output directory (default target/bench/<date-time>).
#
#   ./scripts/bench.sh [output-dir]
#   QUICK=1 ./scripts/bench.sh      # shorter steps, fewer idle clients
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
step_seconds=${STEP_SECONDS:-5}
clients=${CLIENTS:-100000}
calls_seconds=${CALLS_SECONDS:-30}
soak_duration=${SOAK_DURATION:-10m}
if [ "${QUICK:-0}" = 1 ]; then
  step_seconds=3
  clients=10000
  calls_seconds=10
  soak_duration=1m
fi

missing=()
command -v kamailio >/dev/null || missing+=(kamailio)
command -v sipp >/dev/null || missing+=(sip-tester)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
venv=target/benchenv
if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check matplotlib
fi

# UDP buffers for SIP near 3,000 calls/s, ports and descriptors for the idle
# clients. Each is best effort: a container may refuse them.
sysctl -qw net.core.rmem_max=33554432 net.core.wmem_max=33554432 2>/dev/null || echo "note: could not raise UDP buffer limits"
sysctl -qw net.ipv4.ip_local_port_range="1024 65000" 2>/dev/null || true
hard=$(ulimit -Hn)
ulimit -Hn 1048576 2>/dev/null || echo "note: the hard limit of open files stays at $hard (raising it needs CAP_SYS_RESOURCE)"
ulimit -Sn "$(ulimit -Hn)"
fds=$(ulimit -n)
# Both ends of every connection are on this machine, one process each: a
# process can hold about as many clients on their own connections as it has
# descriptors. Clients sharing connections need a descriptor per connection.
own_clients=$clients
if [ "$own_clients" -gt $((fds - 1000)) ]; then
  echo "note: $clients idle clients on their own connections need $clients descriptors per process; this shell allows $fds: measuring $((fds - 1000))"
  own_clients=$((fds - 1000))
fi

cargo build --release --locked -p call-service -p business-service -p videocall-bench
bench=target/release/videocall-bench

echo "== (a) Kamailio + SIPp"
python3 bench/sip/sip_bench.py --step-seconds "$step_seconds" --json "$out/kamailio.json"
echo "== (b) tonic echo"
"$bench" echo --seconds "$step_seconds" --json "$out/echo.json" --markdown "$out/echo.md"
echo "== (c) call service: ramp"
"$bench" ramp --start-rate 1000 --factor 1.3 --step-seconds "$step_seconds" --refine 3 --pairs 5000 \
  --json "$out/ramp.json" --markdown "$out/ramp.md"
echo "== (c) call service: ramp, the business service keeping no call records (--no-records)"
"$bench" ramp --no-records --start-rate 1000 --factor 1.3 --step-seconds "$step_seconds" --refine 3 --pairs 5000 \
  --json "$out/ramp-no-records.json" --markdown "$out/ramp-no-records.md"
echo "== (c) call records on and off at 2,000 calls/s, mixed outcomes"
mixed=(--pairs 3000 --reject 0.1 --cancel 0.05 --no-answer 0.02 --hold-ms 300 --quiet)
"$bench" calls --rate 2000 --calls $((2000 * calls_seconds)) "${mixed[@]}" \
  --json "$out/calls-records.json" --markdown "$out/calls-records.md"
"$bench" calls --rate 2000 --calls $((2000 * calls_seconds)) "${mixed[@]}" --no-records \
  --json "$out/calls-no-records.json" --markdown "$out/calls-no-records.md"
echo "== (c) floor: the same clients and calls through a relay with no call state"
"$bench" ramp --floor --start-rate 1000 --factor 1.3 --step-seconds "$step_seconds" --refine 3 --pairs 5000 \
  --json "$out/ramp-floor.json" --markdown "$out/ramp-floor.md"
echo "== (c) call service: ramp, devices multiplexed over 8 HTTP/2 connections"
"$bench" ramp --start-rate 1000 --factor 1.3 --step-seconds "$step_seconds" --refine 3 --pairs 5000 --shared-connections 8 \
  --json "$out/ramp-shared.json" --markdown "$out/ramp-shared.md"
echo "== (c) call service: $own_clients idle clients, each its own connection"
"$bench" connections --clients "$own_clients" --active-calls 1000 \
  --json "$out/connections.json" --markdown "$out/connections.md"
echo "== (c) call service: $clients idle clients over 64 shared connections"
"$bench" connections --clients "$clients" --shared-connections 64 --active-calls 1000 \
  --json "$out/connections-shared.json" --markdown "$out/connections-shared.md"

echo "== (e) call state in Redis: one node, then three nodes on one Redis"
"$bench" ramp --redis --start-rate 500 --factor 1.3 --step-seconds "$step_seconds" --refine 3 --pairs 5000 \
  --json "$out/ramp-redis.json" --markdown "$out/ramp-redis.md"
"$bench" ramp --nodes 3 --start-rate 500 --factor 1.3 --step-seconds "$step_seconds" --refine 3 --pairs 5000 \
  --json "$out/ramp-cluster.json" --markdown "$out/ramp-cluster.md"
for store in memory redis cluster; do
  case $store in memory) flags=() ;; redis) flags=(--redis) ;; cluster) flags=(--nodes 3) ;; esac
  "$bench" calls --rate 1000 --calls $((1000 * calls_seconds)) --pairs 2000 --quiet "${flags[@]}" \
    --json "$out/calls-$store.json" --markdown "$out/calls-$store.md"
done

for store in redis cluster; do
  case $store in redis) flags=(--redis) ;; cluster) flags=(--nodes 3) ;; esac
  echo "== (e) $clients idle clients over 64 shared connections, $store"
  "$bench" connections --clients "$clients" --shared-connections 64 --active-calls 1000 --quiet "${flags[@]}" \
    --json "$out/connections-$store.json" --markdown "$out/connections-$store.md"
done

echo "== (c) soak: half the highest clean rate for $soak_duration, records on, mixed outcomes"
soak_rate=$(python3 -c "import json; r = json.load(open('$out/ramp.json'))['result']; print(int((r.get('max_clean_rate') or 2000) / 2))")
"$bench" soak --rate "$soak_rate" --duration "$soak_duration" "${mixed[@]}" \
  --json "$out/soak.json" --markdown "$out/soak.md" || echo "note: the soak found calls without a complete record (see soak.md)"
"$venv/bin/python" bench/soak_plot.py "$out/soak.json" "$out/soak.png"

"$venv/bin/python" bench/report.py --kamailio "$out/kamailio.json" --echo "$out/echo.json" \
  --ramp "$out/ramp.json" --ramp-shared "$out/ramp-shared.json" --ramp-floor "$out/ramp-floor.json" --connections "$out/connections.json" \
  --connections-shared "$out/connections-shared.json" --ramp-no-records "$out/ramp-no-records.json" \
  --calls-records "$out/calls-records.json" --calls-no-records "$out/calls-no-records.json" --soak "$out/soak.json" \
  --out-dir "$out"
{
  echo
  echo "## Call state in memory, in Redis, on three nodes (1,000 calls/s)"
  for store in memory redis cluster; do echo; echo "### $store"; echo; cat "$out/calls-$store.md"; done
  echo
  echo "### Ramp, one node on Redis"; echo; cat "$out/ramp-redis.md"
  echo
  echo "### Ramp, three nodes on one Redis"; echo; cat "$out/ramp-cluster.md"
  echo
  echo "### Idle clients over 64 shared connections, one node on Redis"; echo; cat "$out/connections-redis.md"
  echo
  echo "### Idle clients over 64 shared connections, spread over three nodes on one Redis"; echo; cat "$out/connections-cluster.md"
} >> "$out/REPORT.md"
echo
sed -n '1,/^## Call service ramp/p' "$out/REPORT.md" | head -n -1
echo "full report: $out/REPORT.md"
