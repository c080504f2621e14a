#!/usr/bin/env python3
"""Turn bench/run.sh's JSON lines into a Markdown table of medians, with
each peer's ratio to enjent (higher is better for enjent unless noted),
and the pubsub-cluster runs (enjent instances sharing topics through
Redis, against one instance) in a table of their own."""
import json
import re
import statistics
import sys
from collections import defaultdict

ORDER = ["enjent", "enjent-main-loop", "tokio-tungstenite", "fastwebsockets", "tungstenite-threads", "uwebsockets"]

# pubsub-cluster's labels: enjent-N-instance(s)[-redis]. The one instance
# alone is the base of the ratios.
CLUSTER = re.compile(r"^enjent-\d+-instances?(-|$)")
CLUSTER_BASE = "enjent-1-instance"

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
    ("  server CPU per message", "echo", lambda r: r["size"] == 32 and r.get("server_cpu_percent") is not None and r.get("msgs_per_sec"), lambda r: r["server_cpu_percent"] / 100 / r["msgs_per_sec"] * 1e6, "us", False),
    ("echo 10 x 64 KiB, 8 in flight", "echo", lambda r: r["size"] == 65536, "msgs_per_sec", "msg/s", True),
    ("  latency p50", "echo", lambda r: r["size"] == 65536, "p50_us", "us", False),
    ("  latency p99", "echo", lambda r: r["size"] == 65536, "p99_us", "us", False),
    ("broadcast: last delivery p50", "broadcast", None, "last_p50_ms", "ms", False),
    ("broadcast: last delivery p99", "broadcast", None, "last_p99_ms", "ms", False),
    ("broadcast: deliveries/s", "broadcast", None, "deliveries_per_sec", "/s", True),
    ("handshakes/s", "connect", None, "handshakes_per_sec", "/s", True),
    ("  server CPU per handshake", "connect", lambda r: r.get("server_cpu_us_per_handshake") is not None, "server_cpu_us_per_handshake", "us", False),
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
    cluster = [r for r in runs if CLUSTER.match(r["label"])]
    runs = [r for r in runs if not CLUSTER.match(r["label"])]
    if runs:
        peers(runs)
    if cluster:
        if runs:
            print()
        cluster_table(cluster)


def peers(runs):
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
    seen = {k[1] for k in values}
    labels = [l for l in ORDER if l in seen] + sorted(seen - set(ORDER))
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



def failed_labels(runs):
    return [r["label"] for r in runs if r.get("failed")]


# pubsub-cluster: (row name, metric, unit). Ratios are to the one instance
# alone, value over value (above 1: more than the one instance).
CLUSTER_ROWS = [
    ("deliveries/s", "deliveries_per_sec", "/s"),
    ("  offered", "offered_per_sec", "/s"),
    ("latency p50", "p50_ms", "ms"),
    ("latency p99", "p99_ms", "ms"),
    ("latency p99.9", "p999_ms", "ms"),
    ("  deliveries across instances (through Redis): p50", "cross_p50_ms", "ms"),
    ("  deliveries across instances (through Redis): p99", "cross_p99_ms", "ms"),
    ("  share of deliveries across instances", lambda r: 100 * r["cross_deliveries"] / r["deliveries"] if "cross_deliveries" in r and r.get("deliveries") else None, "%"),
    ("server CPU, all instances", "server_cpu_percent", "% of a core"),
    ("Redis CPU", "broker_cpu_percent", "% of a core"),
]


def cluster_table(runs):
    ok = [r for r in runs if not r.get("failed")]
    seen = {r["label"] for r in runs}

    def key(label):  # the one instance first, then by instance count
        m = re.match(r"^enjent-(\d+)", label)
        return (label != CLUSTER_BASE, int(m.group(1)) if m else 0, label)

    labels = sorted(seen, key=key)
    head = ok[0] if ok else runs[0]
    if ok:
        title = "pubsub chat, {topics:,} topics x {subscribers}, {rate:g} msg/s each, client i on instance i % N".format(**head)
    else:
        title = "pubsub chat over instances"
    values = defaultdict(list)  # (row, label) -> values, in run order
    for r in ok:
        for i, (_, metric, _) in enumerate(CLUSTER_ROWS):
            v = metric(r) if callable(metric) else r.get(metric)
            if v is not None:
                values[(i, r["label"])].append(v)
    med = {k: statistics.median(v) for k, v in values.items()}
    print(f"| {title} | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))
    for i, (name, _, unit) in enumerate(CLUSTER_ROWS):
        if not any(k[0] == i for k in med):
            continue
        cells = []
        for l in labels:
            v = med.get((i, l))
            if v is None:
                cells.append("failed" if l in failed_labels(runs) and not any(r["label"] == l for r in ok) else "-")
                continue
            text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"
            base = med.get((i, CLUSTER_BASE))
            if l != CLUSTER_BASE and base and v and base > 0 and v > 0:
                text += f" ({v / base:.2f}x)"
            cells.append(text)
        print(f"| {name} ({unit}) | " + " | ".join(cells) + " |")
    print()
    print(f"Medians; ratios: the figure over {CLUSTER_BASE}'s. Server CPU sums the instances.")
    for l in labels:
        mine = [r for r in ok if r["label"] == l]
        if not mine:
            continue
        each = []
        for r in mine:
            text = f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
            if "cross_p50_ms" in r:
                text += f" (across: p50 {r['cross_p50_ms']:.2f} ms, p99 {r['cross_p99_ms']:.2f} ms)"
            text += f", {r['deliveries_per_sec'] / 1000:,.1f}k deliveries/s"
            each.append(text)
        print(f"{l}, each run: " + "; ".join(each))
    failed = defaultdict(int)
    for l in failed_labels(runs):
        failed[l] += 1
    if failed:
        print("Failed runs: " + ", ".join(f"{l} x{n}" for l, n in failed.items()))


if __name__ == "__main__":
    main()
