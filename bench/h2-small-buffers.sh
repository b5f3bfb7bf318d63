#!/usr/bin/env bash
# An experiment, not a build to ship: how much of an idle device's memory is
# the fixed buffers inside h2 (the HTTP/2 implementation under tonic and
# hyper), which no setting reaches. Builds the call service against a copy of
# h2 from the local cargo registry with its connection write buffer (16 KiB),
# read buffer (8 KiB, tokio-util's default) and HPACK decode buffer (4 KiB)
# at 1 KiB / 1 KiB / 256 bytes, measures memory per idle client, then builds
# the stock one again and measures it the same way.
#
#   bench/h2-small-buffers.sh [clients]     (default 15000)
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-15000}
version=$(cargo metadata --format-version 1 --locked | python3 -c \
  'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="h2"))')
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/h2-"$version" | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"; git checkout -q Cargo.lock' EXIT
cp -r "$src" "$work/h2"
python3 - "$work/h2" <<'PY'
import sys
root = sys.argv[1]
def patch(path, old, new):
    p = f"{root}/{path}"
    s = open(p).read()
    assert old in s, (path, old)
    open(p, "w").write(s.replace(old, new, 1))
patch("src/codec/framed_write.rs", "const DEFAULT_BUFFER_CAPACITY: usize = 16 * 1_024;",
      "const DEFAULT_BUFFER_CAPACITY: usize = 1_024;")
patch("src/codec/mod.rs", ".new_read(framed_write);",
      ".new_codec();\n        let delimited = tokio_util::codec::FramedRead::with_capacity(framed_write, delimited, 1024);")
patch("src/hpack/decoder.rs", "buffer: BytesMut::with_capacity(4096),", "buffer: BytesMut::with_capacity(256),")
PY
cargo build --release -p call-service -p videocall-bench --config "patch.crates-io.h2.path=\"$work/h2\""
echo "== h2 with small buffers"
target/release/videocall-bench connections --clients "$clients" --active-calls 0 --no-business --quiet | grep -E "per idle|RSS"
git checkout -q Cargo.lock
cargo build --release --locked -p call-service -p videocall-bench
echo "== stock h2 $version"
target/release/videocall-bench connections --clients "$clients" --active-calls 0 --no-business --quiet | grep -E "per idle|RSS"
