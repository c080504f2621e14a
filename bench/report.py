#!/usr/bin/env python3
"""Turn bench/run.sh's JSON lines into a Markdown table of medians, with
each peer's ratio to enjent (higher is better for enjent unless noted)."""
import json
import statistics
import sys
from collections import defaultdict

ORDER = ["enjent", "enjent-main-loop", "tokio-tungstenite", "fastwebsockets", "tungstenite-threads"]

FANOUT = lambda r: r.get("shape") == "fanout"
CHAT = lambda r: r.get("shape") == "chat"
SUBSCRIBED = lambda r: "subscribe" in r


def sub(key):
    return lambda r: r["subscribe"][key]


# (row name, scenario, filter, metric, unit, higher_is_better). A name with
# {fields} is filled in from the first run of its row; a metric is a key or
# a function of the run.
ROWS = [
    ("echo 100 x 32 B, 8 in flight", "echo", lambda r: r["size"] == 32, "msgs_per_sec", "msg/s", True),
    ("  latency p50", "echo", lambda r: r["size"] == 32, "p50_us", "us", False),
    ("  latency p99", "echo", lambda r: r["size"] == 32, "p99_us", "us", False),
    ("echo 10 x 64 KiB, 8 in flight", "echo", lambda r: r["size"] == 65536, "msgs_per_sec", "msg/s", True),
    ("  latency p50", "echo", lambda r: r["size"] == 65536, "p50_us", "us", False),
    ("  latency p99", "echo", lambda r: r["size"] == 65536, "p99_us", "us", False),
    ("broadcast: last delivery p50", "broadcast", None, "last_p50_ms", "ms", False),
    ("broadcast: last delivery p99", "broadcast", None, "last_p99_ms", "ms", False),
    ("broadcast: deliveries/s", "broadcast", None, "deliveries_per_sec", "/s", True),
    ("handshakes/s", "connect", None, "handshakes_per_sec", "/s", True),
    ("idle CPU, 10,000 clients (% of a core)", "idle", lambda r: r.get("idle_clients") == 10000 and not SUBSCRIBED(r), "idle_cpu_percent", "%", False),
    ("idle CPU (% of a core)", "idle", lambda r: r.get("idle_clients") != 10000 and not SUBSCRIBED(r), "idle_cpu_percent", "%", False),
    ("pubsub, 1 topic x {clients:,} subscribers: last delivery p50", "pubsub", FANOUT, "last_p50_ms", "ms", False),
    ("  last delivery p99", "pubsub", FANOUT, "last_p99_ms", "ms", False),
    ("  deliveries/s", "pubsub", FANOUT, "deliveries_per_sec", "/s", True),
    ("  server CPU per round", "pubsub", FANOUT, "server_cpu_ms_per_round", "ms", False),
    ("pubsub chat, {topics:,} topics x {subscribers}, {rate:g} msg/s each: deliveries/s", "pubsub", CHAT, "deliveries_per_sec", "/s", True),
    ("  latency p50", "pubsub", CHAT, "p50_ms", "ms", False),
    ("  latency p99", "pubsub", CHAT, "p99_ms", "ms", False),
    ("  server CPU", "pubsub", CHAT, "server_cpu_percent", "% of a core", False),
    ("memory per connection, {subscribe[clients]:,} clients, no subscription", "idle", SUBSCRIBED, sub("bytes_per_conn_before"), "B", False),
    ("  the same in {subscribe[topics]:,} topics", "idle", SUBSCRIBED, sub("bytes_per_conn_after"), "B", False),
    ("  per subscription, topics included", "idle", SUBSCRIBED, sub("bytes_per_sub_all_in"), "B", False),
    ("  a client's first subscription", "idle", SUBSCRIBED, sub("bytes_per_first_sub"), "B", False),
    ("  one more subscription", "idle", SUBSCRIBED, sub("bytes_per_extra_sub"), "B", False),
    ("  per topic (names of {subscribe[topic_name_len]} B)", "idle", SUBSCRIBED, sub("bytes_per_topic"), "B", False),
]


ROWS_IDLE_10K = next(i for i, row in enumerate(ROWS) if row[0].startswith("idle CPU, 10,000"))


def main():
    runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    values = defaultdict(list)  # (row index, label) -> values
    first = {}  # row index -> its first run (for the row's name)
    mem = defaultdict(lambda: defaultdict(list))  # label -> clients -> bytes/conn
    failed = defaultdict(int)
    failed_runs = []
    for r in runs:
        if r.get("failed"):
            failed[(r["scenario"], r["label"])] += 1
            failed_runs.append(r)
            continue
        for i, (_, scen, filt, metric, _, _) in enumerate(ROWS):
            if r["scenario"] == scen and (filt is None or filt(r)):
                v = metric(r) if callable(metric) else r.get(metric)
                if v is not None:
                    values[(i, r["label"])].append(v)
                    first.setdefault(i, r)
        if r["scenario"] == "idle" and not SUBSCRIBED(r):
            for s in r["steps"]:
                mem[r["label"]][s["clients"]].append(s["bytes_per_conn"])
    labels = [l for l in ORDER if any(k[1] == l for k in values)]
    med = {k: statistics.median(v) for k, v in values.items()}
    print("| measure | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))

    def kind(scenario, shape, subscribed):
        return (scenario, shape, subscribed)

    def row_kind(i):
        _, scen, filt, _, _, _ = ROWS[i]
        shape = "fanout" if filt is FANOUT else "chat" if filt is CHAT else None
        return kind(scen, shape, filt is SUBSCRIBED)

    def failed_in_row(i, label):
        # run.sh's record of a failed run has its scenario, and the shape
        # and --subscribe of its arguments.
        return any(
            r["label"] == label
            and kind(r["scenario"], r.get("shape"), "subscribe" in r) == row_kind(i)
            for r in failed_runs
        )

    def cell(i, label, higher):
        v = med.get((i, label))
        if v is None:
            return "failed" if failed_in_row(i, label) else "-"
        base = med.get((i, "enjent"))
        text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"
        if label != "enjent" and base and v and base > 0 and v > 0:
            ratio = base / v if higher else v / base
            text += f" ({ratio:.2f}x)"
        return text

    for i, (name, _, _, _, unit, higher) in enumerate(ROWS):
        if not any(k[0] == i for k in med):
            continue
        name = name.format(**first[i])
        print(f"| {name} ({unit}) | " + " | ".join(cell(i, l, higher) for l in labels) + " |")
    for clients in sorted({c for per in mem.values() for c in per}):
        row = []
        base = statistics.median(mem["enjent"][clients]) if mem["enjent"].get(clients) else None
        for l in labels:
            vals = mem[l].get(clients)
            if not vals:
                row.append("-")
                continue
            v = statistics.median(vals)
            text = f"{v:,.0f}"
            if l != "enjent" and base:
                text += f" ({v / base:.1f}x)"
            row.append(text)
        print(f"| memory per idle connection at {clients:,} (B) | " + " | ".join(row) + " |")
    print()
    print("Ratios: how many times better enjent is (above 1) or worse (below 1).")
    # Each run of the throughput rows, in the order they ran: the spread
    # says how far one median can be trusted.
    for i, (name, _, _, _, unit, higher) in enumerate(ROWS):
        if unit not in ("msg/s", "/s"):
            continue
        runs = [(l, values.get((i, l))) for l in labels]
        if any(v and len(v) > 1 for _, v in runs):
            name = name.format(**first[i])
            print(f"{name.strip()}, each run: " + "; ".join(
                f"{l} " + ", ".join(f"{x / 1000:,.1f}k" for x in v) for l, v in runs if v))
    for label in labels:
        runs_idle = values.get((ROWS_IDLE_10K, label))
        if runs_idle and len(runs_idle) > 1:
            print(f"Idle CPU at 10,000 clients, each run, {label}: " + ", ".join(f"{v:.2f}%" for v in runs_idle))
    if failed:
        print("Failed runs: " + ", ".join(f"{l} {s} x{n}" for (s, l), n in failed.items()))


if __name__ == "__main__":
    main()
