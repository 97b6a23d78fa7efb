#!/usr/bin/env python3
"""The before/after table from scripts/bench-compare.sh's JSON: each figure
is the median of every sample of every round (3 runs x ROUNDS), with the
change after/before. Usage: scripts/bench-compare-table.py [DIR]"""
import glob, json, statistics, sys

d = sys.argv[1] if len(sys.argv) > 1 else "target/bench-compare"

def load(tag, scen):
    return [json.load(open(f)) for f in sorted(glob.glob(f"{d}/{tag}-{scen}-*.json"))]

def pooled(docs, pick):
    xs = []
    for doc in docs:
        xs += pick(doc)
    return statistics.median(xs) if xs else float("nan")

rows = []
def row(name, unit, scen, pick, better_low):
    b, a = pooled(load("before", scen), pick), pooled(load("after", scen), pick)
    ch = (a - b) / b * 100 if b else float("nan")
    worse = ch > 0 if better_low else ch < 0
    rows.append((name, unit, b, a, ch, worse))

for rank, hops in [(0, 0), (1, 1), (3, 2)]:
    for pad in (0, 65536):
        def sel(doc, key, rank=rank, pad=pad):
            return [s for r in doc["rpc"]["results"] if r["rank"] == rank and r["pad"] == pad for s in r[key]["samples"]]
        label = f"RPC to rank {rank} ({hops} hops), {'64 KiB' if pad else '0 B'}"
        row(label + ", p50", "µs", "rpc", lambda doc, s=sel: s(doc, "latency_p50_us"), True)
        row(label + ", window 64", "req/s", "rpc", lambda doc, s=sel: s(doc, "throughput_rps"), False)
row("events published, window 64", "/s", "event", lambda doc: doc["event"]["rate_window_n"]["samples"], False)
row("events delivered on every rank, window 64", "/s", "event", lambda doc: doc["event"]["delivered_window_n"]["samples"], False)
row("events published, window 1", "/s", "event", lambda doc: doc["event"]["rate_window_1"]["samples"], False)
for n in (1, 8, 16, 64):
    row(f"start, size {n}", "s", "start", lambda doc, n=n: [s for r in doc["start"]["results"] if r["size"] == n for s in r["wall_s"]["samples"]], True)
row("routed messages/s (memory scenario)", "/s", "memory", lambda doc: doc["memory"]["round_msgs_per_s"], False)
row("rank 1 RSS after routing", "KiB", "memory", lambda doc: [b["after_kib"][-1] for b in doc["memory"]["brokers"] if b["rank"] == 1], True)

loads = {t: [doc["machine"]["loadavg"] for s in ("rpc", "event", "start", "memory") for doc in load(t, s)] for t in ("before", "after")}
print("| measure | before | after | change |")
print("|---|---|---|---|")
for name, unit, b, a, ch, worse in rows:
    fmt = (lambda v: f"{v:.3f}") if unit == "s" else (lambda v: f"{v:,.0f}")
    print(f"| {name} | {fmt(b)} {unit} | {fmt(a)} {unit} | {ch:+.1f}%{' (worse)' if worse and abs(ch) > 5 else ''} |")
print()
for t, l in loads.items():
    print(f"load average at each {t} scenario's start: " + "; ".join(l))
