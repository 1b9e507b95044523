#!/usr/bin/env python3
"""Run the shared yardstick (``mqttbench.py``) with PERSISTENT subscribers.

``mqttbench.py`` connects every client with Clean Session 1.  This wrapper imports it
unchanged from its file and replaces its ``connect_pkt`` so that *subscriber*
connections (client ids ``<prefix>s<N>`` of the throughput scenarios and ``<prefix>ls``
of latency_qos1) use Clean Session 0; publishers, storm clients and ``ping`` stay clean.
Everything else (scenarios, measurement, JSON lines, tables) is the shared tool's own.

Subscriber client ids are ``mb<pid%100000><run%100><name>``: stable for one scenario run,
new for the next one. A persistent session therefore outlives its run in the broker; run
one scenario repetition per freshly started broker on a fresh data dir (as
``bench/durable_fanin.sh`` does) or stale offline sessions subscribed to the same
filter get a copy of every later message.

  bench/durable_fanin.py [--mqttbench PATH] [--persistent-subs] <mqttbench args...>
  bench/durable_fanin.py summary RESULTS.jsonl STATS.jsonl   # table used by durable_fanin.sh

PATH (or $MQTTBENCH) defaults to ../shared/bench/mqttbench.py relative to the repo root.
Without --persistent-subs (or DURABLE_SUBS=1) the run is exactly mqttbench.py's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BENCH = os.path.join(ROOT, "..", "shared", "bench", "mqttbench.py")
# <prefix>=mb + 5 digits (pid) + 2 digits (run counter); subscribers: s<N> / ls
SUB_ID = re.compile(r"^mb\d{7}(s\d+|ls)$")


def load_mqttbench(path: str):
    spec = importlib.util.spec_from_file_location("mqttbench", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"durable_fanin: cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mqttbench"] = mod
    spec.loader.exec_module(mod)
    return mod


def make_persistent(mod) -> dict:
    """Patch mod.connect_pkt: subscriber CONNECTs get Clean Session 0."""
    orig = mod.connect_pkt
    seen = {"persistent": 0, "clean": 0}

    def connect_pkt(client_id: str, keepalive: int = 300, clean: bool = True) -> bytes:
        if SUB_ID.match(client_id):
            clean = False
        seen["clean" if clean else "persistent"] += 1
        return orig(client_id, keepalive=keepalive, clean=clean)

    mod.connect_pkt = connect_pkt
    return seen


# --- summary ------------------------------------------------------------------------------


def _med(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) < 1000:
        return f"{v:.{nd}f}"
    return f"{int(round(v)):,}"


def summary(results_path: str, stats_path: str) -> None:
    res = [json.loads(l) for l in open(results_path) if l.startswith("{")]
    stats = [json.loads(l) for l in open(stats_path) if l.startswith("{")] if os.path.exists(stats_path) else []
    by = {}
    for s in stats:
        by[(s["label"], s["scenario"], s["rep"])] = s
    labels = list(dict.fromkeys(r["target"] for r in res))
    scen = list(dict.fromkeys(r["scenario"] for r in res))
    for sc in scen:
        print(f"\n{sc}: medians over repetitions (store figures per run: whole broker lifetime,"
              " incl. warm-up and drain; msgs/fsync = messages published / fsyncs)\n")
        if sc == "latency_qos1":
            head = ["target", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "missing", "broker cpu %"]
        else:
            head = ["target", "n", "delivered/s (min..max)", "vs first", "pub-acked/s", "missing %",
                    "gen cpu %", "broker cpu %"]
        head += ["fsyncs", "msgs/fsync", "commits/fsync", "records/fsync", "store bytes_on_disk",
                 "data dir du bytes", "sessions after"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        base = None
        for lab in labels:
            rs = [r for r in res if r["target"] == lab and r["scenario"] == sc]
            if not rs:
                continue
            ss = [by.get((lab, sc, r["rep"]), {}) for r in rs]
            st = [s.get("stats", {}).get("store") or {} for s in ss]
            if sc == "latency_qos1":
                cells = [lab, str(len(rs))] + [_fmt(_med([r.get(k) for r in rs]), 3)
                                               for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
                cells += [_fmt(_med([r.get("missing_total") for r in rs])),
                          _fmt(_med([r.get("broker_cpu_pct") for r in rs]))]
            else:
                d = [r.get("delivered_per_s") for r in rs if isinstance(r.get("delivered_per_s"), (int, float))]
                md = _med(d)
                if base is None:
                    base = md
                rel = f"{100 * md / base:.0f} %" if md and base else "-"
                cells = [lab, str(len(rs)), f"{_fmt(md)} ({_fmt(min(d)) if d else '-'}..{_fmt(max(d)) if d else '-'})",
                         rel, _fmt(_med([r.get("pub_acked_per_s") for r in rs])),
                         _fmt(_med([r.get("missing_pct") for r in rs]), 2),
                         _fmt(_med([r.get("gen_cpu_pct") for r in rs])),
                         _fmt(_med([r.get("broker_cpu_pct") for r in rs]))]
            fs = [t.get("fsyncs") for t in st]
            mpf = [r.get("sent_total") / t["fsyncs"] for r, t in zip(rs, st)
                   if t.get("fsyncs") and isinstance(r.get("sent_total"), (int, float))]
            cells += [_fmt(_med(fs)), _fmt(_med(mpf)), _fmt(_med([t.get("avg_batch_commits") for t in st])),
                      _fmt(_med([t.get("avg_batch_records") for t in st])),
                      _fmt(_med([t.get("bytes_on_disk") for t in st])),
                      _fmt(_med([s.get("du_bytes") for s in ss])),
                      _fmt(_med([s.get("stats", {}).get("sessions") for s in ss]))]
            print("| " + " | ".join(cells) + " |")
    if stats and not any((s.get("stats") or {}).get("store") for s in stats):
        print("\n(no \"store\" object in /api/v1/stats: this node does not report store stats;"
              " fsync columns are empty)")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "summary":
        if len(argv) != 3:
            raise SystemExit("usage: durable_fanin.py summary RESULTS.jsonl STATS.jsonl")
        summary(argv[1], argv[2])
        return 0
    path = os.environ.get("MQTTBENCH", DEFAULT_BENCH)
    persistent = os.environ.get("DURABLE_SUBS", "") == "1"
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--mqttbench":
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--mqttbench="):
            path = a.split("=", 1)[1]
        elif a == "--persistent-subs":
            persistent = True
        else:
            rest.append(a)
        i += 1
    mod = load_mqttbench(os.path.normpath(path))
    seen = make_persistent(mod) if persistent else None
    rc = mod.main(rest)
    if seen is not None and rest and rest[0] == "run":
        print(f"durable_fanin: CONNECTs sent: {seen['persistent']} with Clean Session 0 (subscribers),"
              f" {seen['clean']} with Clean Session 1", file=sys.stderr)
        if not seen["persistent"]:
            print("durable_fanin: WARNING: no subscriber matched; mqttbench's client ids changed?",
                  file=sys.stderr)
            rc = rc or 3
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
