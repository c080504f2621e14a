#!/usr/bin/env bash
# Build enjent's echo and pubsub examples, the peer servers and the load generator,
# run each scenario against every server in turn (A B C D E, then B C D E
# A, ...), and print a Markdown table of medians with ratios to enjent.
# The pubsub scenarios run enjent's examples/pubsub and the peers in their
# pubsub mode (no enjent-main-loop there).
#
#   bench/run.sh                 # full run (about 40 minutes)
#   ROUNDS=1 QUICK=1 bench/run.sh   # smoke run (CI): short loads, the peers
#                                   # in the 32 B echo and pubsub fan-out only
#   ONLY="pubsub-fanout pubsub-chat" bench/run.sh   # those scenarios alone
#   PEER_UWS=/path/to/uws_peer bench/run.sh    # with uWebSockets as a peer
#   SERVERS="enjent enjent-main-loop uwebsockets" bench/run.sh   # those alone
#
# pubsub-cluster: three instances of examples/pubsub (built with the redis
# feature) sharing topics through a throwaway redis-server on loopback,
# under the chat load spread over the three, against one instance alone
# (no Redis) under the same load. Needs redis-server on the PATH.
#
# PEER_UWS: a uWebSockets peer binary, started like the others as
# `BINARY ADDR echo|broadcast|pubsub`, printing `listening on ws://ADDR`
# (flushed) once it listens; it is measured as `uwebsockets`.
#
# PUBSUB_BIN: an examples/pubsub binary built with the redis feature, used
# instead of the release build this script otherwise makes (CI's smoke run
# passes the debug build its tests made: a release build of the redis
# crate and its URL parser took 214 s of CPU there, for figures nobody
# judges).
#
# BENCH_PROFILE: the cargo profile the load generator and the peers are
# built with (default release). CI's smoke run builds them with dev: a
# release build of tokio, hyper and the rest took 199 s of CPU there, a
# dev build 108 s.
#
# Results: target/bench/results.jsonl (one JSON line per run) and
# target/bench/table.md.
set -euo pipefail
# Before the cd, so that a relative path still works.
peer_uws="${PEER_UWS:+$(realpath -- "$PEER_UWS")}"
if [ -n "$peer_uws" ] && [ ! -x "$peer_uws" ]; then
    echo "PEER_UWS: $PEER_UWS is not an executable"
    exit 1
fi
pubsub_bin="${PUBSUB_BIN:+$(realpath -- "$PUBSUB_BIN")}"
if [ -n "$pubsub_bin" ] && [ ! -x "$pubsub_bin" ]; then
    echo "PUBSUB_BIN: $PUBSUB_BIN is not an executable"
    exit 1
fi
cd "$(dirname "$0")/.."
root=$PWD
rounds="${ROUNDS:-3}"
quick="${QUICK:-}"
# Between runs: a second for the machine to settle, a moment in a smoke run.
pause=1
[ -z "$quick" ] || pause=0.2
out="$root/target/bench"
mkdir -p "$out"
: > "$out/results.jsonl"

cargo build --release --example echo
# pubsub with the redis feature, for pubsub-cluster (without --redis it
# serves as before).
if [ -z "$pubsub_bin" ]; then
    cargo build --release --features redis --example pubsub
    pubsub_bin="$root/target/release/examples/pubsub"
fi
bench_profile="${BENCH_PROFILE:-release}"
(cd bench && cargo build --profile "$bench_profile" --bins)
# Where cargo puts a profile's builds: dev and test in debug, bench in
# release, any other under its own name.
case $bench_profile in
    dev | test) bench_dir=debug ;;
    bench) bench_dir=release ;;
    *) bench_dir=$bench_profile ;;
esac
bench_bin="$root/bench/target/$bench_dir"
loadgen="$bench_bin/loadgen"

# name -> command (all take: ADDR echo|broadcast|pubsub, except enjent's
# pubsub mode, a separate example: see pubsub_servers)
declare -A servers=(
    [enjent]="$root/target/release/examples/echo"
    [enjent-main-loop]="$root/target/release/examples/echo --main-loop"
    [tokio-tungstenite]="$bench_bin/peer_tokio_tungstenite"
    [fastwebsockets]="$bench_bin/peer_fastwebsockets"
    [tungstenite-threads]="$bench_bin/peer_tungstenite_threads"
)
order=(enjent enjent-main-loop tokio-tungstenite fastwebsockets tungstenite-threads)
# Mode pubsub: enjent is examples/pubsub (ADDR only; it has no main-loop
# variant); the peers are started as `PEER ADDR pubsub`.
declare -A pubsub_servers=(
    [enjent]="$pubsub_bin"
)
pubsub_order=(enjent tokio-tungstenite fastwebsockets tungstenite-threads)
if [ -n "$peer_uws" ]; then
    servers[uwebsockets]="$peer_uws"
    order+=(uwebsockets)
    pubsub_order+=(uwebsockets)
fi
# SERVERS="enjent uwebsockets ...": those servers alone (in the usual
# order). Scenarios none of them serves are skipped: the pubsub ones
# without a pubsub server among them, pubsub-cluster without enjent.
if [ -n "${SERVERS:-}" ]; then
    for name in $SERVERS; do
        [ -n "${servers[$name]:-}" ] || echo "SERVERS: no server $name here (uwebsockets needs PEER_UWS); skipped"
    done
    keep() { local n; for n in "$@"; do [[ " $SERVERS " == *" $n "* ]] && printf '%s\n' "$n"; done; }
    mapfile -t order < <(keep "${order[@]}")
    mapfile -t pubsub_order < <(keep "${pubsub_order[@]}")
    if [ ${#order[@]} -eq 0 ]; then
        echo "SERVERS: none of $SERVERS is a server here"
        exit 1
    fi
fi

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
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}

# pubsub-cluster: a throwaway Redis and the instances of examples/pubsub.
redis_pid=""
redis_port=""
cluster_pids=()
cluster_addrs=()
start_redis() {
    local p
    # A free loopback port (one that is taken in between makes
    # redis-server exit: then another).
    for _ in 1 2 3 4 5; do
        p=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no > "$out/redis.log" 2>&1 &
        redis_pid=$!
        for _ in $(seq 1 100); do
            if grep -q "Ready to accept connections" "$out/redis.log" 2>/dev/null; then
                redis_port=$p
                return 0
            fi
            kill -0 "$redis_pid" 2>/dev/null || break
            sleep 0.05
        done
        stop_redis
    done
    echo "redis-server did not start"; cat "$out/redis.log"; return 1
}
stop_redis() {
    if [ -n "$redis_pid" ]; then
        kill "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    redis_pid=""
    redis_port=""
}
start_instance() { # [--redis URL]: one more examples/pubsub
    port=$((port + 1))
    local k=${#cluster_pids[@]} log
    log="$out/cluster-$k.log"
    "${pubsub_servers[enjent]}" "127.0.0.1:$port" "$@" > "$log" 2>&1 &
    cluster_pids+=($!)
    cluster_addrs+=("127.0.0.1:$port")
    for _ in $(seq 1 100); do
        # With --redis: until the bridge is up, too.
        if grep -q "listening on ws://127.0.0.1:$port" "$log" 2>/dev/null &&
            { [ $# -eq 0 ] || grep -q "^bridge up" "$log"; }; then
            return 0
        fi
        sleep 0.05
    done
    echo "pubsub instance $k ($*) did not start"; cat "$log"; return 1
}
stop_cluster() {
    local pid
    for pid in "${cluster_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    cluster_pids=()
    cluster_addrs=()
}
cleanup() {
    stop_server
    stop_cluster
    stop_redis
}
trap cleanup EXIT

# A failed run's record: its scenario, and the shape and --subscribe of its
# arguments, so that report.py knows which rows failed.
record_failure() { # name scenario args...
    local name=$1 scenario=$2 extra="" prev="" a
    shift 2
    for a in "$@"; do
        [ "$prev" = --shape ] && extra+=",\"shape\":\"$a\""
        [ "$prev" = --subscribe ] && extra+=",\"subscribe\":null"
        prev=$a
    done
    echo "{\"scenario\":\"$scenario\",\"label\":\"$name\",\"failed\":true$extra}" >> "$out/results.jsonl"
}

run() { # name mode scenario args...
    local name=$1 mode=$2 scenario=$3
    shift 3
    echo "-- $name $scenario $*"
    start_server "$name" "$mode"
    if "$loadgen" "$scenario" --addr "127.0.0.1:$port" --label "$name" --server-pid "$server_pid" "$@" >> "$out/results.jsonl" 2> "$out/last.log"; then
        tail -n 2 "$out/last.log" | sed "s/^/  /"
    else
        echo "  $name $scenario FAILED:"; tail -n 5 "$out/last.log" | sed "s/^/    /"
        record_failure "$name" "$scenario" "$@"
    fi
    stop_server
    sleep "$pause"
}

run_cluster() { # name instances redis|no-redis pubsub-args...
    local name=$1 n=$2 bridge=$3 i
    shift 3
    echo "-- $name pubsub $*"
    local with=()
    if [ "$bridge" = redis ]; then
        start_redis
        with=(--redis "redis://127.0.0.1:$redis_port")
    fi
    for i in $(seq 1 "$n"); do
        start_instance "${with[@]}"
    done
    local addrs pids broker=()
    addrs=$(IFS=,; echo "${cluster_addrs[*]}")
    pids=$(IFS=,; echo "${cluster_pids[*]}")
    [ -n "$redis_pid" ] && broker=(--broker-pid "$redis_pid")
    if "$loadgen" pubsub --addr "$addrs" --label "$name" --server-pid "$pids" "${broker[@]}" "$@" >> "$out/results.jsonl" 2> "$out/last.log"; then
        grep -v "^fd limit" "$out/last.log" | sed "s/^/  /"
    else
        echo "  $name pubsub FAILED:"; tail -n 5 "$out/last.log" | sed "s/^/    /"
        record_failure "$name" pubsub "$@"
    fi
    # What the bridges said besides coming up (an outage, missed messages).
    for i in $(seq 0 $((n - 1))); do
        grep -v -e "^listening on" -e "^bridge up" "$out/cluster-$i.log" | head -n 5 | sed "s/^/  instance $i: /" || true
    done
    stop_cluster
    stop_redis
    sleep "$pause"
}

if [ -n "$quick" ]; then
    idle_clients=100; idle_at=100; idle_secs=1; echo_secs=1; echo_reps=1; bc_clients=200; bc_rounds=3; conn_secs=1
    ps_clients=200; ps_rounds=3; chat_topics=20; chat_secs=2; mem_clients=200; mem_topics=20
    cl_topics=100; cl_rate=1; cl_secs=3
else
    idle_clients=1000,10000,19900; idle_at=10000; idle_secs=60; echo_secs=5; echo_reps=2; bc_clients=10000; bc_rounds=20; conn_secs=4
    ps_clients=10000; ps_rounds=20; chat_topics=1000; chat_secs=6; mem_clients=10000; mem_topics=1000
    # 0.5 msg/s: at 1 msg/s (90,000 deliveries/s, the pubsub-chat load)
    # three instances, Redis and the load generator leave this 2-core
    # machine no idle time, and the tail measures its run queue (p99 from
    # 8 to 600 ms from one run to the next); at 0.5 it is ~30% idle.
    cl_topics=1000; cl_rate=0.5; cl_secs=10
fi
# Chat: topics of 10 subscribers, each publishing this often (msg/s).
chat_subs=10; chat_rate=1
# pubsub-cluster: the chat load, client i on instance i % 3, so that each
# topic's members spread over the three (cl_topics must not be a multiple
# of 3).
cl_subs=10

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

# A smoke run (QUICK) checks that every peer starts and answers, in the
# 32 B echo and the pubsub fan-out; the other scenarios run enjent alone.
smoke_skips() { # scenario name
    [ -n "$quick" ] || return 1
    case $1 in echo32 | pubsub-fanout) return 1 ;; esac
    [[ "$2" != enjent* ]]
}

# ONLY="pubsub-fanout pubsub-chat ..." runs those scenarios alone (the
# names are next_turn's); unset, everything runs.
want() {
    if [ -n "${SERVERS:-}" ]; then
        case $1 in
        pubsub-cluster) [[ " $SERVERS " == *" enjent "* ]] || return 1 ;;
        pubsub-*) [ ${#pubsub_order[@]} -gt 0 ] || return 1 ;;
        esac
    fi
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]
}

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
                smoke_skips echo64k "$name" && continue
                run "$name" echo echo --clients 10 --size 65536 --inflight 8 --seconds "$echo_secs"
            done
        fi
    done
    if want broadcast; then
        next_turn broadcast
        for name in "${turn[@]}"; do
            smoke_skips broadcast "$name" && continue
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
            smoke_skips pubsub-chat "$name" && continue
            run "$name" pubsub pubsub --shape chat --topics "$chat_topics" --subscribers "$chat_subs" --rate "$chat_rate" --seconds "$chat_secs"
        done
    fi
    if want pubsub-cluster; then
        next_turn pubsub-cluster enjent-3-instances-redis enjent-1-instance
        for name in "${turn[@]}"; do
            if [ "$name" = enjent-3-instances-redis ]; then
                instances=3; bridge=redis
            else
                instances=1; bridge=no-redis
            fi
            run_cluster "$name" "$instances" "$bridge" --shape chat --topics "$cl_topics" --subscribers "$cl_subs" --rate "$cl_rate" --seconds "$cl_secs"
        done
    fi
    if [ "$r" = 1 ]; then
        # What subscriptions cost in memory: first round only, like the
        # idle ramp.
        if want pubsub-memory; then
            next_turn pubsub-memory "${pubsub_order[@]}"
            for name in "${turn[@]}"; do
                smoke_skips pubsub-memory "$name" && continue
                run "$name" pubsub idle --clients "$mem_clients" --idle-at "$mem_clients" --seconds 1 --subscribe "$mem_topics"
            done
        fi
    fi
    if want connect; then
        next_turn connect
        for name in "${turn[@]}"; do
            smoke_skips connect "$name" && continue
            run "$name" echo connect --seconds "$conn_secs"
        done
    fi
    if want idle; then
        next_turn idle
        for name in "${turn[@]}"; do
            smoke_skips idle "$name" && continue
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
if grep -q '"label":"enjent[a-z0-9-]*","failed":true' "$out/results.jsonl"; then
    echo "an enjent run failed"
    exit 1
fi
