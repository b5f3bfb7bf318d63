#!/usr/bin/env bash
# docker-compose up on a machine with no container registry: builds the
# Debian base image locally (scripts/docker-base.sh), the release binaries
# with cargo on the host, the images from the Dockerfile's runtime stages,
# and starts the pair. Arguments go to `docker-compose up` (default: -d).
#
#   scripts/compose-local.sh           # docker-compose.yml: one call service
#   scripts/compose-local.sh cluster   # docker-compose.cluster.yml: Redis,
#                                      # three nodes, HAProxy (their base
#                                      # image has Debian's redis-server and
#                                      # haproxy in it)
set -euo pipefail
cd "$(dirname "$0")/.."
files=()
ops=videocall-base:bookworm
if [ "${1:-}" = cluster ]; then
  shift
  files=(-f docker-compose.cluster.yml)
  ops=videocall-ops:bookworm
  ./scripts/docker-base.sh "$ops" redis-server haproxy
fi
base=videocall-base:bookworm
./scripts/docker-base.sh "$base"
cargo build --release --locked -p call-service -p business-service --bins
mkdir -p target/docker
cp target/release/call-service target/release/business-service target/docker/
docker-compose "${files[@]}" build --build-arg RUST_IMAGE="$base" \
  --build-arg RUNTIME_IMAGE="$base" --build-arg OPS_IMAGE="$ops"
docker image prune -f --filter label=videocall.stage=builder >/dev/null
docker-compose "${files[@]}" up "${@:--d}"
