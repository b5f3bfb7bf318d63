#!/usr/bin/env bash
# docker-compose up on a machine with no container registry: builds the
# Debian base image locally (scripts/docker-base.sh), the release binaries
# with cargo on the host, the images from the Dockerfile's runtime stages,
# and starts the pair. Arguments go to `docker-compose up` (default: -d).
set -euo pipefail
cd "$(dirname "$0")/.."
base=videocall-base:bookworm
./scripts/docker-base.sh "$base"
cargo build --release --locked -p call-service -p business-service --bins
mkdir -p target/docker
cp target/release/call-service target/release/business-service target/docker/
docker-compose build --build-arg RUST_IMAGE="$base" --build-arg RUNTIME_IMAGE="$base"
docker image prune -f --filter label=videocall.stage=builder >/dev/null
docker-compose up "${@:--d}"
