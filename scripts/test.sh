#!/usr/bin/env bash
# Runs every test. Sets up what the tests need beyond the Rust toolchain:
# a Python virtual environment with examples/python/requirements.txt (from
# PyPI), for the any-language tests. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyenv
if ! "$venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "setting up $venv (Python packages for the any-language tests)..."
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r examples/python/requirements.txt
fi
export VIDEOCALL_PYTHON="$PWD/$venv/bin/python"

cargo test --workspace "$@"
