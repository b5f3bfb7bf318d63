#!/usr/bin/env bash
# Brings up the business service and the call service on localhost (the call
# service in development-identity mode, so the scripted clients need no
# tokens), runs two scripted phones through the call flow, and stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

CALL_PORT=${CALL_PORT:-50051}
ADMIN_PORT=${ADMIN_PORT:-50052}
HOOK_PORT=${HOOK_PORT:-50061}

echo "building (the first build takes a few minutes)..."
cargo build --quiet -p call-service -p business-service --bins
cargo build --quiet -p client-sdk --example demo

logs=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Waits for a service's "listening" line on its stdout.
wait_ready() {
  for _ in $(seq 1 100); do
    grep -q listening "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "service did not start; its log:" >&2
  cat "$1" "$1.err" >&2
  exit 1
}

RUST_LOG=${RUST_LOG:-warn} target/debug/business-service serve \
  --listen "127.0.0.1:$HOOK_PORT" --block-caller mallory --database "$logs/records.db" \
  >"$logs/business.out" 2>"$logs/business.out.err" &
pids+=($!)
wait_ready "$logs/business.out"

RUST_LOG=${RUST_LOG:-warn} target/debug/call-service \
  --client-addr "127.0.0.1:$CALL_PORT" --admin-addr "127.0.0.1:$ADMIN_PORT" \
  --business-url "http://127.0.0.1:$HOOK_PORT" --dev-identity \
  >"$logs/call.out" 2>"$logs/call.out.err" &
pids+=($!)
wait_ready "$logs/call.out"

echo "business-service on 127.0.0.1:$HOOK_PORT, call-service on 127.0.0.1:$CALL_PORT (admin $ADMIN_PORT)"
target/debug/examples/demo --url "http://127.0.0.1:$CALL_PORT" --admin-url "http://127.0.0.1:$ADMIN_PORT"

echo
echo "== the call records the business service kept (business-service records recent)"
# Notices reach the business service just after the events; give it a moment.
sleep 0.5
target/debug/business-service records --database "$logs/records.db" recent
