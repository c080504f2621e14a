#!/usr/bin/env bash
# Run the Autobahn test suite (through kosoku, from PyPI) against
# examples/echo and fail unless every case passes.
#
#   tests/autobahn/run.sh            # from the repository root
#
# Environment: AUTOBAHN_VENV (default target/autobahn-venv),
# AUTOBAHN_PORT (default 9001), AUTOBAHN_OUT (default target/autobahn),
# AUTOBAHN_FEATURES (cargo features for the echo build, e.g. deflate).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${AUTOBAHN_VENV:-target/autobahn-venv}"
port="${AUTOBAHN_PORT:-9001}"
out="${AUTOBAHN_OUT:-target/autobahn}"
features="${AUTOBAHN_FEATURES:-}"
check_args=()

if [ ! -x "$venv/bin/kosoku" ]; then
    echo "autobahn: installing kosoku into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # Pinned: check.py expects this version's 517 cases.
    "$venv/bin/pip" install --quiet kosoku==0.1.0
fi

cargo_args=(build --release --example echo)
echo_args=()
if [ -n "$features" ]; then
    cargo_args+=(--features "$features")
    check_args+=(--require-compression)
    # kosoku 0.1.0 errors on uncompressed messages in a compressed session
    # (RFC 7692 allows them), so echo compresses everything for this run.
    # At zlib's level 1: level 6 (the default) spent most of this run
    # compressing the 72 cases of 128 KiB text (eight of them: 48 s at
    # level 6, 37 s at 1, the server's CPU 42 s against 20 s). The cases
    # check framing, negotiation, window sizes and context takeover; level
    # 1 writes fixed-Huffman blocks only, so the dynamic blocks of level 6
    # are left to tests/deflate.rs and Chromium in tests/browser.rs.
    echo_args+=(--compress-all --compress-level 1)
fi
cargo "${cargo_args[@]}"

rm -rf "$out"
mkdir -p "$out"
./target/release/examples/echo "127.0.0.1:$port" echo --max-message-size 16777216 "${echo_args[@]}" >"$out/echo.log" 2>&1 &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true; wait "$echo_pid" 2>/dev/null || true' EXIT

# Wait for the server to listen.
for _ in $(seq 1 100); do
    grep -q "listening on" "$out/echo.log" && break
    kill -0 "$echo_pid" || { cat "$out/echo.log"; exit 1; }
    sleep 0.1
done
grep -q "listening on" "$out/echo.log" || { echo "autobahn: echo did not start"; cat "$out/echo.log"; exit 1; }

# kosoku exits non-zero when any case is not OK (UNIMPLEMENTED included);
# the verdict is check.py's, from the report.
rc=0
# --foreground: kosoku stays in this script's process group, so that
# stopping the group (as .ci/background does when CI stops) stops it too.
timeout --foreground 900 "$venv/bin/kosoku" -p 4 -o "$out" "127.0.0.1:$port" >"$out/kosoku.log" 2>&1 || rc=$?
tail -n 3 "$out/kosoku.log"
# A run cut off by the timeout is a failure, whatever its partial report says.
[ "$rc" != 124 ] || { echo "autobahn: kosoku did not finish within 900 s"; exit 1; }

# The server must have survived the whole suite.
kill -0 "$echo_pid" || { echo "autobahn: echo died during the run"; cat "$out/echo.log"; exit 1; }
python3 tests/autobahn/check.py "$out" "${check_args[@]}"
