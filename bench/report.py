#!/usr/bin/env python3
"""Turn bench/run.sh's JSON lines into a Markdown table of medians, with
each peer's ratio to enjent (higher is better for enjent unless noted)."""
import json
import statistics
import sys
from collections import defaultdict

ORDER = ["enjent", "enjent-main-loop", "tokio-tungstenite", "fastwebsockets", "tungstenite-threads"]

# (row name, scenario, filter, metric, unit, higher_is_better)
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
    ("idle CPU, 10,000 clients (% of a core)", "idle", lambda r: r.get("idle_clients") == 10000, "idle_cpu_percent", "%", False),
    ("idle CPU (% of a core)", "idle", lambda r: r.get("idle_clients") != 10000, "idle_cpu_percent", "%", False),
]


ROWS_IDLE_10K = next(i for i, row in enumerate(ROWS) if row[0].startswith("idle CPU, 10,000"))


def main():
    runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    values = defaultdict(list)  # (row index, label) -> values
    mem = defaultdict(lambda: defaultdict(list))  # label -> clients -> bytes/conn
    failed = defaultdict(int)
    for r in runs:
        if r.get("failed"):
            failed[(r["scenario"], r["label"])] += 1
            continue
        for i, (_, scen, filt, metric, _, _) in enumerate(ROWS):
            if r["scenario"] == scen and (filt is None or filt(r)):
                values[(i, r["label"])].append(r[metric])
        if r["scenario"] == "idle":
            for s in r["steps"]:
                mem[r["label"]][s["clients"]].append(s["bytes_per_conn"])
    labels = [l for l in ORDER if any(k[1] == l for k in values)]
    med = {k: statistics.median(v) for k, v in values.items()}
    print("| measure | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))

    def cell(i, label, higher):
        v = med.get((i, label))
        if v is None:
            return "failed" if any(f[1] == label for f in failed) else "-"
        base = med.get((i, "enjent"))
        text = f"{v:,.0f}" if v >= 100 else f"{v:,.2f}"
        if label != "enjent" and base and v:
            ratio = base / v if higher else v / base
            text += f" ({ratio:.2f}x)"
        return text

    for i, (name, _, _, _, unit, higher) in enumerate(ROWS):
        if not any(k[0] == i for k in med):
            continue
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
