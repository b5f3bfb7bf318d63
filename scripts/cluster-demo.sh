#!/usr/bin/env bash
# A cluster on this machine: Redis, three call-service nodes sharing their
# call state in it, HAProxy in front of them (round-robin, TCP) and the
# business service. Two scripted phones (client-sdk/examples/cluster_demo.rs)
# land on different nodes and talk; the caller's node is killed (SIGKILL)
# mid-call; the caller's client resumes through HAProxy on another node, the
# callee sees nothing, and the call goes on. Installs redis-server and
# haproxy (Debian's packages) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

LB_PORT=${LB_PORT:-50150}
REDIS_PORT=${REDIS_PORT:-6390}
HOOK_PORT=${HOOK_PORT:-50170}

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v haproxy >/dev/null || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)..."
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "building (the first build takes a few minutes)..."
cargo build --quiet -p call-service -p business-service --bins
cargo build --quiet -p client-sdk --example cluster_demo

run=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT

# Waits until `file` has a line matching `pattern`.
wait_for() {
  for _ in $(seq 1 100); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "not ready ($2); its log:" >&2
  cat "$1" >&2
  exit 1
}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" \
  >"$run/redis.log" 2>&1 &
pids+=($!)
wait_for "$run/redis.log" "Ready to accept connections"

RUST_LOG=warn target/debug/business-service serve --listen "127.0.0.1:$HOOK_PORT" \
  --no-metrics --database "$run/records.db" >"$run/business.log" 2>&1 &
pids+=($!)
wait_for "$run/business.log" listening

nodes=()
servers=""
for i in 1 2 3; do
  client=$((LB_PORT + i))
  NO_COLOR=1 RUST_LOG=info target/debug/call-service --dev-identity \
    --redis-url "redis://127.0.0.1:$REDIS_PORT/" --node-lease 1s --resume-grace 10s \
    --business-url "http://127.0.0.1:$HOOK_PORT" \
    --client-addr "127.0.0.1:$client" --admin-addr "127.0.0.1:$((LB_PORT + 10 + i))" --no-metrics \
    >"$run/node$i.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  wait_for "$run/node$i.log" "joined the cluster"
  id=$(grep -o 'joined the cluster node=[0-9]*' "$run/node$i.log" | grep -o '[0-9]*$')
  echo "node $id: client API 127.0.0.1:$client (pid $pid)"
  nodes+=(--node "$id=$pid")
  servers+="  server node$id 127.0.0.1:$client check inter 500ms fall 1 rise 2"$'\n'
done

# HAProxy asks each node's gRPC health (as in deploy/haproxy.cfg), through
# `call-service healthcheck --addr`, and sends clients only to SERVING nodes.
cat >"$run/grpc-health-check" <<CHECK
#!/bin/sh
exec "$PWD/target/debug/call-service" healthcheck --addr "\$3:\$4"
CHECK
chmod +x "$run/grpc-health-check"
cat >"$run/haproxy.cfg" <<CFG
global
  external-check
  insecure-fork-wanted
defaults
  mode tcp
  timeout connect 1s
  timeout client 1h
  timeout server 1h
frontend calls
  bind 127.0.0.1:$LB_PORT
  default_backend nodes
backend nodes
  balance roundrobin
  option external-check
  external-check path "/usr/bin:/bin"
  external-check command $run/grpc-health-check
$servers
CFG
haproxy -f "$run/haproxy.cfg" -db >"$run/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$LB_PORT") 2>/dev/null && break
  sleep 0.1
done
echo "haproxy on 127.0.0.1:$LB_PORT in front of the three; Redis on $REDIS_PORT"
echo

target/debug/examples/cluster_demo --url "http://127.0.0.1:$LB_PORT" "${nodes[@]}"

echo
echo "== the call record the business service kept (business-service records recent)"
# The notices reach it through the notice lanes just after the events.
sleep 0.5
target/debug/business-service records --database "$run/records.db" recent
