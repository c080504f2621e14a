#!/usr/bin/env bash
# Userland instructions per message of an echo, counted by valgrind's
# callgrind: a measure of the server's own work that the machine's noise
# does not move (timings here vary by 10-30% between runs; this count by
# well under 1%). The kernel's work (system calls, wake-ups) is not in it.
#
#   bench/instructions.sh                      # examples/echo, 32 B echo
#   bench/instructions.sh --main-loop          # its main-loop style (BURST=0: see below)
#   SIZE=65536 CLIENTS=10 bench/instructions.sh
#   LOAD=connect bench/instructions.sh         # per handshake (loadgen connect)
#   BIN=/path/to/server bench/instructions.sh ARGS...   # another build
#
# The server runs under valgrind (about 30 times slower), so the load
# generator's clients always have messages waiting: batches are larger
# than at full speed, and figures compare builds, not servers. Prints
# the messages echoed, instructions per message, and the functions that
# take the most (TOP, default 25), per message: their own instructions, or
# with INCLUSIVE=1 those of what they call too. Needs valgrind (Debian:
# apt-get install valgrind). The server must not use instructions
# valgrind does not know (a C++ peer built with -march=native fails).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if [ -z "${BIN:-}" ]; then
    # A main loop under valgrind sends more slowly than at full speed, so
    # some of its sends that would be part of a burst (and go to the
    # pool's flush job) are not, and are written at once (a quarter of
    # them in one count): with --main-loop the server is built with the
    # burst's gap at 20 ms (`--cfg enjent_wide_burst`, src/runtime/conn.rs),
    # which writes about as often as at full speed. BURST=0 counts the
    # other path. The flag goes in with the user's RUSTFLAGS (or
    # CARGO_ENCODED_RUSTFLAGS), which replace, for this build, any
    # rustflags of cargo's configuration files.
    target="$root/target/instructions"
    flags=()
    case " $* " in
    *" --main-loop "*)
        if [ "${BURST:-1}" != 0 ]; then
            target="$root/target/instructions-burst"
            if [ -n "${CARGO_ENCODED_RUSTFLAGS:-}" ]; then
                flags=("CARGO_ENCODED_RUSTFLAGS=$CARGO_ENCODED_RUSTFLAGS"$'\x1f'--cfg$'\x1f'enjent_wide_burst)
            else
                flags=("RUSTFLAGS=${RUSTFLAGS:+$RUSTFLAGS }--cfg enjent_wide_burst")
            fi
        fi
        ;;
    esac
    # Line tables, so that the functions inlined into others are named.
    env "${flags[@]}" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_TARGET_DIR="$target" \
        cargo build --release --example echo
    BIN="$target/release/examples/echo"
fi
(cd bench && cargo build --release --bin loadgen)
loadgen="$root/bench/target/release/loadgen"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000))
valgrind --tool=callgrind --callgrind-out-file="$work/out" "$BIN" "127.0.0.1:$port" "$@" \
    > "$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 150); do
    grep -q listening "$work/server.log" && break
    sleep 0.2
done
if [ "${LOAD:-echo}" = connect ]; then
    # Handshakes of 16 clients at a time, each closed once upgraded.
    result=$("$loadgen" connect --addr "127.0.0.1:$port" --concurrency 16 \
        --seconds "${SECONDS_OF_LOAD:-10}" --server-pid "$pid")
    unit=handshakes
else
    result=$("$loadgen" echo --addr "127.0.0.1:$port" --clients "${CLIENTS:-100}" \
        --size "${SIZE:-32}" --inflight 8 --seconds "${SECONDS_OF_LOAD:-10}" --server-pid "$pid")
    unit=messages
fi
# SIGINT ends the server; callgrind writes its counts as the process exits.
kill -INT "$pid"
for _ in $(seq 50); do
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.2
done
kill "$pid" 2> /dev/null || true
wait "$pid" || true
messages=$(echo "$result" | python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$unit")
total=$(awk '/^(summary|totals):/ {print $2; exit}' "$work/out")
echo "$unit $messages, instructions $total, per ${unit%s} $((total / messages))"
callgrind_annotate --inclusive="$([ -n "${INCLUSIVE:-}" ] && echo yes || echo no)" "$work/out" 2> /dev/null | grep -E '^ *[0-9,]+ \(' | sed -n "2,$((${TOP:-25} + 1))p" |
    sed -E 's/^ *([0-9,]+) \( *[0-9.]+%\) +/\1 /' |
    while read -r ir rest; do
        printf '%7d  %s\n' "$((${ir//,/} / messages))" "${rest%% \[*}"
    done
