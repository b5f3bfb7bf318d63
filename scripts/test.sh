#!/usr/bin/env bash
# Runs every test, the end-to-end suites three ways (one node in memory,
# one node on Redis, three nodes on one Redis). Sets up what the tests need beyond the Rust toolchain:
# tmux, debootstrap, redis-server, chromium, chromium-driver and docker-compose (Debian packages, with
# apt-get), and a Python virtual
# environment with examples/python/requirements.txt and
# tests/python/requirements.txt (from PyPI), for the any-language tests and
# the third-party clients. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Programs the tests drive, from Debian's packages: tmux (the terminal phone
# test), debootstrap (the local base image of the container test),
# redis-server (the shared store's tests start their own on a free port),
# chromium with its chromedriver (the web phone's browser tests) and
# docker-compose (the container tests; Docker itself comes with the machine).
missing=()
command -v tmux >/dev/null || missing+=(tmux)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages the tests drive)..."
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

venv=target/pyenv
if ! "$venv/bin/python" -c 'import grpc, grpc_tools, grpc_health, grpc_reflection, prometheus_client, selenium' 2>/dev/null; then
  echo "setting up $venv (Python packages for the any-language and third-party-client tests)..."
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    -r examples/python/requirements.txt -r tests/python/requirements.txt
fi
export VIDEOCALL_PYTHON="$PWD/$venv/bin/python"

cargo test --workspace "$@"

# The end-to-end suites again, with the call state in Redis: one node, then
# three nodes on one Redis with each test's clients spread over them (the
# harness reads VIDEOCALL_TEST_STORE; see tests/src/lib.rs). `--workspace`
# as above, so the dependencies keep the features they were built with
# (`-p videocall-tests` alone would rebuild some of them).
e2e=(--test call_flow --test security --test resume --test notices --test hardening
  --test business --test observability --test phone --test web)
for store in redis cluster; do
  echo "end-to-end suites, call state: $store"
  VIDEOCALL_TEST_STORE=$store cargo test --workspace "${e2e[@]}" "$@"
done
