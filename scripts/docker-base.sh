#!/usr/bin/env bash
# Builds the local Debian bookworm base image the container images start
# from (tag: videocall-base:bookworm, or $1), the way a registry's
# debian:bookworm-slim would: debootstrap --variant=minbase, then
# `docker import`. Further arguments are Debian packages to include (the
# cluster's Redis and HAProxy images start from such a base, since no build
# step can reach a mirror on a machine without a registry):
#
#   scripts/docker-base.sh videocall-ops:bookworm redis-server haproxy
#
# A no-op when the image exists. Needs root, debootstrap, and Debian's
# package mirror.
set -euo pipefail
tag=${1:-videocall-base:bookworm}
shift || true
include=()
[ $# -eq 0 ] || include=("--include=$(IFS=,; echo "$*")")
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm (minbase) from $mirror into $root ..."
debootstrap --variant=minbase "${include[@]}" bookworm "$root" "$mirror" >/dev/null
# Trim what a runtime image does not need, as the slim images do.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar -C "$root" -c . | docker import \
  --change 'CMD ["/bin/bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  - "$tag" >/dev/null
echo "built base image $tag"
