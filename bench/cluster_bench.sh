#!/usr/bin/env bash
# Cross-node speed of a local 3-node cluster with the shared yardstick (a benchmark, not a
# test): same-node (publishers and subscriber on node 1) against cross-node (publishers on
# node 1, subscriber on node 2) in one run, plus a connection storm whose CONNECTs each
# need a Raft claim. Nodes on CPU 0, the generator on CPU 1.
#
#   bench/cluster_bench.sh            # REPEAT=3 DURATION=10 by default
# Needs: make test (the .venv), ../shared/bench, /tmp/bench-venv (see its README).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${BENCH:-$HERE/../shared/bench/mqttbench.py}"
PY="${PY:-/tmp/bench-venv/bin/python}"
REPEAT="${REPEAT:-3}"
DURATION="${DURATION:-10}"
WORK="${WORK:-/tmp/shoal-cluster-bench}"
OUT="${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S).jsonl}"
rm -rf "$WORK/data"; mkdir -p "$WORK/data"
export SHOAL_CLUSTER_SECRET="bench-secret-$RANDOM$RANDOM"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
for i in 1 2 3; do
  join=(); [ "$i" -gt 1 ] && join=(--join 127.0.0.1:27001)
  taskset -c 0 "$HERE/.venv/bin/python" -m cluster run --node-id "n$i" --mqtt-port $((28830 + i)) \
    --admin-port $((28840 + i)) --cluster-port $((27001 + 2 * (i - 1))) --data-dir "$WORK/data/n$i" \
    --log-level warning "${join[@]}" > "$WORK/n$i.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do curl -sf "127.0.0.1:$((28840 + i))/healthz" >/dev/null && break; sleep 0.2; done
done
for _ in $(seq 100); do
  n=$(curl -sf 127.0.0.1:28841/api/v1/cluster | "$PY" -c 'import json,sys; print(sum(n["status"]=="up" for n in json.load(sys.stdin)["nodes"]))' || echo 0)
  [ "$n" = 3 ] && break; sleep 0.2
done
echo "cluster up; results -> $OUT"
for rep in $(seq "$REPEAT"); do
  for mode in same cross; do
    sub=28831; [ "$mode" = cross ] && sub=28832
    taskset -c 1 "$PY" "$BENCH" run --port 28831 --sub-port "$sub" --label "cluster-$mode" \
      --scenarios fanin_qos0,fanin_qos1_e2e --duration "$DURATION" --repeat 1 --rep-base $((rep - 1)) \
      --json-out "$OUT" --quiet > /dev/null
  done
  taskset -c 1 "$PY" "$BENCH" run --port 28832 --label cluster-storm --scenarios conn_storm \
    --repeat 1 --rep-base $((rep - 1)) --json-out "$OUT" --quiet > /dev/null
done
"$PY" "$BENCH" report "$OUT"
curl -s 127.0.0.1:28841/api/v1/cluster | "$PY" -m json.tool | head -12
