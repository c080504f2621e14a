#!/usr/bin/env bash
# Build enjent's echo and pubsub examples, the peer servers and the load generator,
# run each scenario against every server in turn (A B C D E, then B C D E
# A, ...), and print a Markdown table of medians with ratios to enjent.
# The pubsub scenarios run enjent's examples/pubsub and the peers in their
# pubsub mode (no enjent-main-loop there).
#
#   bench/run.sh                 # full run (about 40 minutes)
#   ROUNDS=1 QUICK=1 bench/run.sh   # smoke run (CI)
#   ONLY="pubsub-fanout pubsub-chat" bench/run.sh   # those scenarios alone
#
# Results: target/bench/results.jsonl (one JSON line per run) and
# target/bench/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
rounds="${ROUNDS:-3}"
quick="${QUICK:-}"
out="$root/target/bench"
mkdir -p "$out"
: > "$out/results.jsonl"

cargo build --release --example echo --example pubsub
(cd bench && cargo build --release --bins)
loadgen="$root/bench/target/release/loadgen"

# name -> command (all take: ADDR echo|broadcast|pubsub, except enjent's
# pubsub mode, a separate example: see pubsub_servers)
declare -A servers=(
    [enjent]="$root/target/release/examples/echo"
    [enjent-main-loop]="$root/target/release/examples/echo --main-loop"
    [tokio-tungstenite]="$root/bench/target/release/peer_tokio_tungstenite"
    [fastwebsockets]="$root/bench/target/release/peer_fastwebsockets"
    [tungstenite-threads]="$root/bench/target/release/peer_tungstenite_threads"
)
order=(enjent enjent-main-loop tokio-tungstenite fastwebsockets tungstenite-threads)
# Mode pubsub: enjent is examples/pubsub (ADDR only; it has no main-loop
# variant); the peers are started as `PEER ADDR pubsub`.
declare -A pubsub_servers=(
    [enjent]="$root/target/release/examples/pubsub"
)
pubsub_order=(enjent tokio-tungstenite fastwebsockets tungstenite-threads)

port=14000
server_pid=""
start_server() { # name mode
    port=$((port + 1))
    # Empty the log first: otherwise the previous server's "listening on"
    # can be found before the new server has even opened it.
    : > "$out/server.log"
    if [ "$2" = pubsub ] && [ -n "${pubsub_servers[$1]:-}" ]; then
        ${pubsub_servers[$1]} "127.0.0.1:$port" > "$out/server.log" 2>&1 &
    else
        # shellcheck disable=SC2086 # the command may carry a flag
        ${servers[$1]} "127.0.0.1:$port" "$2" > "$out/server.log" 2>&1 &
    fi
    server_pid=$!
    for _ in $(seq 1 100); do
        grep -q "listening on ws://127.0.0.1:$port" "$out/server.log" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "$1 did not start"; cat "$out/server.log"; return 1
}
stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}
trap 'stop_server' EXIT

run() { # name mode scenario args...
    local name=$1 mode=$2 scenario=$3
    shift 3
    echo "-- $name $scenario $*"
    start_server "$name" "$mode"
    if "$loadgen" "$scenario" --addr "127.0.0.1:$port" --label "$name" --server-pid "$server_pid" "$@" >> "$out/results.jsonl" 2> "$out/last.log"; then
        tail -n 2 "$out/last.log" | sed "s/^/  /"
    else
        echo "  $name $scenario FAILED:"; tail -n 5 "$out/last.log" | sed "s/^/    /"
        # The shape and --subscribe, so that report.py knows which rows failed.
        local extra="" prev=""
        for a in "$@"; do
            [ "$prev" = --shape ] && extra+=",\"shape\":\"$a\""
            [ "$prev" = --subscribe ] && extra+=",\"subscribe\":null"
            prev=$a
        done
        echo "{\"scenario\":\"$scenario\",\"label\":\"$name\",\"failed\":true$extra}" >> "$out/results.jsonl"
    fi
    stop_server
    sleep 1
}

if [ -n "$quick" ]; then
    idle_clients=100; idle_at=100; idle_secs=2; echo_secs=2; echo_reps=1; bc_clients=200; bc_rounds=3; conn_secs=1
    ps_clients=200; ps_rounds=3; chat_topics=20; chat_secs=2; mem_clients=200; mem_topics=20
else
    idle_clients=1000,10000,19900; idle_at=10000; idle_secs=60; echo_secs=5; echo_reps=2; bc_clients=10000; bc_rounds=20; conn_secs=4
    ps_clients=10000; ps_rounds=20; chat_topics=1000; chat_secs=6; mem_clients=10000; mem_topics=1000
fi
# Chat: topics of 10 subscribers, each publishing this often (msg/s).
chat_subs=10; chat_rate=1

# Scenario by scenario, every server in turn (A B C D E), so that the runs
# one ratio compares are seconds apart rather than a whole round: this
# machine's speed drifts by 10-30% over tens of seconds, for every server
# alike. Each pass starts one server later than that scenario's last
# (B C D E A, ...), so that no server always runs first.
# The echo scenarios, short and the noisiest, run twice per round.
declare -A passes
next_turn() { # scenario [servers...]; sets $turn to the server order for its next pass
    local scenario=$1 k=${passes[$1]:-0} i
    shift
    local names=("$@")
    [ ${#names[@]} -gt 0 ] || names=("${order[@]}")
    local n=${#names[@]}
    turn=()
    for i in $(seq 0 $((n - 1))); do
        turn+=("${names[$(((i + k) % n))]}")
    done
    passes[$scenario]=$((k + 1))
}

# ONLY="pubsub-fanout pubsub-chat ..." runs those scenarios alone (the
# names are next_turn's); unset, everything runs.
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

for r in $(seq 1 "$rounds"); do
    echo "== round $r of $rounds"
    for _ in $(seq 1 "$echo_reps"); do
        if want echo32; then
            next_turn echo32
            for name in "${turn[@]}"; do
                run "$name" echo echo --clients 100 --size 32 --inflight 8 --seconds "$echo_secs"
            done
        fi
        if want echo64k; then
            next_turn echo64k
            for name in "${turn[@]}"; do
                run "$name" echo echo --clients 10 --size 65536 --inflight 8 --seconds "$echo_secs"
            done
        fi
    done
    if want broadcast; then
        next_turn broadcast
        for name in "${turn[@]}"; do
            run "$name" broadcast broadcast --clients "$bc_clients" --size 32 --rounds "$bc_rounds"
        done
    fi
    if want pubsub-fanout; then
        next_turn pubsub-fanout "${pubsub_order[@]}"
        for name in "${turn[@]}"; do
            run "$name" pubsub pubsub --shape fanout --clients "$ps_clients" --size 32 --rounds "$ps_rounds"
        done
    fi
    if want pubsub-chat; then
        next_turn pubsub-chat "${pubsub_order[@]}"
        for name in "${turn[@]}"; do
            run "$name" pubsub pubsub --shape chat --topics "$chat_topics" --subscribers "$chat_subs" --rate "$chat_rate" --seconds "$chat_secs"
        done
    fi
    if [ "$r" = 1 ]; then
        # What subscriptions cost in memory: first round only, like the
        # idle ramp.
        if want pubsub-memory; then
            next_turn pubsub-memory "${pubsub_order[@]}"
            for name in "${turn[@]}"; do
                run "$name" pubsub idle --clients "$mem_clients" --idle-at "$mem_clients" --seconds 1 --subscribe "$mem_topics"
            done
        fi
    fi
    if want connect; then
        next_turn connect
        for name in "${turn[@]}"; do
            run "$name" echo connect --seconds "$conn_secs"
        done
    fi
    if want idle; then
        next_turn idle
        for name in "${turn[@]}"; do
            # Memory varies little between runs and the full ramp costs a
            # minute per server: run in the first round only. Idle CPU is
            # measured at 10,000 clients (the target's figure), before the last
            # step opens the rest. Peers send no pings, so their idle CPU is 0
            # every time; enjent's is measured again in every later round (at
            # 10,000 clients only, which also adds to its median memory there).
            if [ "$r" = 1 ]; then
                run "$name" echo idle --clients "$idle_clients" --idle-at "$idle_at" --seconds "$idle_secs"
            elif [[ "$name" == enjent* ]]; then
                run "$name" echo idle --clients "$idle_at" --idle-at "$idle_at" --seconds "$idle_secs"
            fi
        done
    fi
done

python3 "$root/bench/report.py" "$out/results.jsonl" | tee "$out/table.md"

# enjent itself must never fail a scenario (peers may: a thread per client
# does not reach 10,000 clients).
if grep -q '"label":"enjent[a-z-]*","failed":true' "$out/results.jsonl"; then
    echo "an enjent run failed"
    exit 1
fi
