#!/usr/bin/env bash
# QoS 1 fan-in to PERSISTENT subscribers with --durability safe and fast, against the
# in-memory figure of the same scenario (clean-session subscribers: nothing is stored).
# A benchmark, not a test. Uses the shared yardstick (../shared/bench/mqttbench.py,
# unchanged) through bench/durable_fanin.py, which gives subscribers Clean Session 0.
#
# Every (repetition, scenario, mode) gets a freshly started node on a fresh data dir
# (the subscriber client ids change per run, so a reused node would keep the previous
# run's offline sessions subscribed to the same filter); modes are interleaved per
# repetition. Node on BROKER_CPU, generator on GEN_CPU; all traffic on 127.0.0.1.
#
#   bench/durable_fanin.sh                     # REPEAT=3 DURATION=10
#   REPEAT=1 DURATION=3 bench/durable_fanin.sh # quick look
#
# Environment (defaults in brackets):
#   MODES        inmem safe fast  (inmem = clean subscribers, node on --durability safe)
#                also: cluster, replicated: a 2-node cluster (the second node on
#                REPLICA_CPU [GEN_CPU]), persistent subscribers on the first, --durability
#                safe, session_replicas 0 / 1: the cost of replication, in one run
#                (e.g. MODES="cluster replicated")
#   SCENARIOS    fanin_qos1_e2e latency_qos1  (space separated mqttbench scenarios)
#   REPEAT [3]  DURATION [10]  BROKER_CPU [0]  GEN_CPU [1]  PIN [1]
#   MQTT_PORT [18833]  ADMIN_PORT [18843]  (admin API for GET /api/v1/stats after each run)
#   BENCH        [<repo>/../shared/bench/mqttbench.py]
#   PY           generator python [/tmp/bench-venv/bin/python if present, else <repo>/.venv/bin/python]
#   SHOAL        [<repo>/.venv/bin/shoal]     SHOAL_ARGS  extra `shoal run` args []
#   BENCH_ARGS   extra `mqttbench.py run` args []
#   WORK         [${TMPDIR:-/tmp}/shoal-durable-bench]   OUT [$WORK/results-<time>.jsonl]
#   KEEP_DATA    1 = keep each run's data dir [0]
# Needs: make test (the .venv), ../shared/bench (see its README for /tmp/bench-venv).
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WRAP="$ROOT/bench/durable_fanin.py"
BENCH="${BENCH:-$ROOT/../shared/bench/mqttbench.py}"
if [ -z "${PY:-}" ]; then
  PY="$ROOT/.venv/bin/python"; [ -x /tmp/bench-venv/bin/python ] && PY=/tmp/bench-venv/bin/python
fi
SHOAL="${SHOAL:-$ROOT/.venv/bin/shoal}"
SHOAL_ARGS="${SHOAL_ARGS:-}"
BENCH_ARGS="${BENCH_ARGS:-}"
MODES="${MODES:-inmem safe fast}"
SCENARIOS="${SCENARIOS:-fanin_qos1_e2e latency_qos1}"
REPEAT="${REPEAT:-3}"
DURATION="${DURATION:-10}"
PIN="${PIN:-1}"
BROKER_CPU="${BROKER_CPU:-0}"
GEN_CPU="${GEN_CPU:-1}"
MQTT_PORT="${MQTT_PORT:-18833}"
ADMIN_PORT="${ADMIN_PORT:-18843}"
WORK="${WORK:-${TMPDIR:-/tmp}/shoal-durable-bench}"
KEEP_DATA="${KEEP_DATA:-0}"
mkdir -p "$WORK/logs"
STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="${OUT:-$WORK/results-$STAMP.jsonl}"
STATS="${OUT%.jsonl}.stats.jsonl"
export MQTTBENCH="$BENCH"

die() { echo "durable_fanin: $*" >&2; exit 1; }
[ -f "$BENCH" ] || die "no mqttbench.py at $BENCH (set BENCH)"
[ -x "$PY" ] || die "no python at $PY (set PY)"
[ -x "$SHOAL" ] || die "no shoal at $SHOAL (make test creates .venv; or set SHOAL)"
"$PY" -c 'import uvloop' 2>/dev/null || echo "durable_fanin: warning: uvloop missing in $PY, using asyncio's loop" >&2
BPIN=(); GPIN=()
if [ "$PIN" = 1 ]; then
  if taskset -c "$BROKER_CPU" true 2>/dev/null && taskset -c "$GEN_CPU" true 2>/dev/null; then
    BPIN=(taskset -c "$BROKER_CPU"); GPIN=(taskset -c "$GEN_CPU")
  else
    echo "durable_fanin: warning: taskset unavailable, running unpinned" >&2
  fi
fi
# nothing may already listen on our ports (we would measure someone else's broker)
if "$PY" "$WRAP" ping --port "$MQTT_PORT" --timeout 0.3 2>/dev/null; then
  die "something already answers MQTT on 127.0.0.1:$MQTT_PORT"
fi
curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$ADMIN_PORT/" && die "127.0.0.1:$ADMIN_PORT is in use (set ADMIN_PORT)"

REPLICA_CPU="${REPLICA_CPU:-$GEN_CPU}"
CLUSTER_PORT="${CLUSTER_PORT:-18853}"  # and +1 (Raft), +2 / +3 for the second node
RPIN=(); [ "${#BPIN[@]}" -gt 0 ] && RPIN=(taskset -c "$REPLICA_CPU")
BPID=""; RPID=""; DATA=""; GENPID=""
start_node() {  # $1 = durability, $2 = log, $3 = session_replicas (cluster) or ""; sets BPID
  DATA="$(mktemp -d "$WORK/data.XXXXXX")"
  local cluster=()
  if [ -n "${3:-}" ]; then
    cluster=(--node-id n1 --cluster-port "$CLUSTER_PORT" --cluster-secret bench-secret-0123456789
             --cluster-name "bench-$STAMP" --session-replicas "$3")
  fi
  # shellcheck disable=SC2086
  "${BPIN[@]}" "$SHOAL" run --host 127.0.0.1 --mqtt-port "$MQTT_PORT" --admin-host 127.0.0.1 \
    --admin-port "$ADMIN_PORT" --data-dir "$DATA/n1" --log-level warning --durability "$1" \
    "${cluster[@]}" $SHOAL_ARGS >> "$2" 2>&1 &
  BPID=$!
  if ! "$PY" "$WRAP" ping --port "$MQTT_PORT" --timeout 20 || ! kill -0 "$BPID" 2>/dev/null; then
    echo "durable_fanin: node did not come up (see $2)" >&2
    stop_node; return 1
  fi
  [ -n "${3:-}" ] || return 0
  # the second node: joins the first; the subscribers' replicas live there
  # shellcheck disable=SC2086
  "${RPIN[@]}" "$SHOAL" run --host 127.0.0.1 --mqtt-port $((MQTT_PORT + 1)) \
    --admin-host 127.0.0.1 --admin-port $((ADMIN_PORT + 1)) --data-dir "$DATA/n2" \
    --log-level warning --durability "$1" --node-id n2 --cluster-port $((CLUSTER_PORT + 2)) \
    --cluster-secret bench-secret-0123456789 --cluster-name "bench-$STAMP" --session-replicas "$3" \
    --join "127.0.0.1:$CLUSTER_PORT" $SHOAL_ARGS >> "$2" 2>&1 &
  RPID=$!
  for _ in $(seq 200); do
    curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$((ADMIN_PORT + 1))/readyz" && return 0
    kill -0 "$RPID" 2>/dev/null || break
    sleep 0.1
  done
  echo "durable_fanin: the second node did not join (see $2)" >&2
  stop_node; return 1
}
stop_one() {  # $1 = pid
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 150); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$1" 2>/dev/null && { echo "durable_fanin: node $1 still up after 15 s, KILL" >&2; kill -KILL "$1" 2>/dev/null; }
  wait "$1" 2>/dev/null
}
stop_node() {
  [ -n "$RPID" ] && stop_one "$RPID"
  RPID=""
  [ -n "$BPID" ] && stop_one "$BPID"
  BPID=""
}
cleanup() {
  [ -n "$GENPID" ] && kill -TERM "$GENPID" 2>/dev/null  # the timeout wrapper passes it on
  stop_node
  if [ "$KEEP_DATA" != 1 ] && [ -n "$DATA" ] && [ -d "$DATA" ]; then rm -rf "$DATA"; fi
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

node_fp() { find "$ROOT/node" -name '*.py' -type f | LC_ALL=C sort | xargs cat | cksum | cut -d' ' -f1; }
FP0="$(node_fp)"
echo "durable_fanin: modes [$MODES] scenarios [$SCENARIOS] repeat $REPEAT duration ${DURATION}s"
echo "  node: $SHOAL ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD -- node 2>/dev/null || echo '+dirty node/'))"
echo "  generator: $PY, $BENCH; results -> $OUT, node stats -> $STATS"
for rep in $(seq "$REPEAT"); do
  for sc in $SCENARIOS; do
    for mode in $MODES; do
      case "$mode" in
        inmem) durability=safe; subs=(); label=inmem-clean; replicas="" ;;
        safe|fast) durability=$mode; subs=(--persistent-subs); label="persist-$mode"; replicas="" ;;
        cluster) durability=safe; subs=(--persistent-subs); label=cluster-r0; replicas=0 ;;
        replicated) durability=safe; subs=(--persistent-subs); label=cluster-r1; replicas=1 ;;
        *) die "unknown mode $mode (inmem, safe, fast, cluster, replicated)" ;;
      esac
      log="$WORK/logs/$label-$STAMP.log"
      echo "=== rep $rep $sc $label $(date +%T)" >> "$log"
      start_node "$durability" "$log" "$replicas" || continue
      # shellcheck disable=SC2086
      timeout -k 5 $((DURATION + 120)) "${GPIN[@]}" "$PY" "$WRAP" "${subs[@]}" run --port "$MQTT_PORT" \
        --label "$label" --scenarios "$sc" --duration "$DURATION" --repeat 1 --rep-base $((rep - 1)) \
        --broker-pid "$BPID" --json-out "$OUT" --quiet $BENCH_ARGS > /dev/null 2>> "$log" &
      GENPID=$!
      wait "$GENPID" || echo "durable_fanin: $label/$sc rep $rep reported a failure (see $OUT, $log)" >&2
      GENPID=""
      node_stats="$(curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/api/v1/stats" \
        | "$PY" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))' 2>/dev/null)"
      [ -n "$node_stats" ] || node_stats='{}'
      stop_node
      du_bytes="$(du -sb "$DATA" | cut -f1)"
      du_h="$(du -sh "$DATA" | cut -f1)"
      printf '{"label": "%s", "scenario": "%s", "rep": %d, "durability": "%s", "du_bytes": %s, "stats": %s}\n' \
        "$label" "$sc" "$rep" "$durability" "$du_bytes" "$node_stats" >> "$STATS"
      "$PY" - "$OUT" "$STATS" "$WRAP" "$du_h" <<'EOF' 2>/dev/null
import json, sys, os
sys.argv.pop(0)
out, stats, wrap, du = sys.argv
sys.path.insert(0, os.path.dirname(wrap))
r = json.loads(open(out).readlines()[-1])
s = json.loads(open(stats).readlines()[-1]).get("stats", {})
st = s.get("store") or {}
if r["scenario"] == "latency_qos1":
    head = "p50 %s ms, p99 %s ms, max %s ms" % (r.get("p50_ms"), r.get("p99_ms"), r.get("max_ms"))
else:
    head = "delivered %s/s, pub-acked %s/s, missing %s%%" % (r.get("delivered_per_s"), r.get("pub_acked_per_s"), r.get("missing_pct"))
fs = st.get("fsyncs")
mpf = " (%.1f msgs/fsync)" % (r["sent_total"] / fs) if fs and r.get("sent_total") else ""
print("  rep %s %-13s %-15s gen %5s%% node %5s%%  %s | sessions after %s, fsyncs %s%s, data dir %s%s" % (
    r["rep"], r["target"], r["scenario"], r.get("gen_cpu_pct"), r.get("broker_cpu_pct"), head,
    s.get("sessions", "?"), fs if fs is not None else "-", mpf, du,
    "  ERRORS %s" % r["errors"] if r.get("errors") else ""), flush=True)
EOF
      if [ "$KEEP_DATA" != 1 ]; then rm -rf "$DATA"; fi
      DATA=""
    done
  done
done

if [ "$(node_fp)" != "$FP0" ]; then
  echo "durable_fanin: WARNING: node/ changed during the run; the repetitions measured different code" \
    | tee -a "${OUT%.jsonl}.table.md" >&2
fi
echo
"$PY" "$WRAP" report "$OUT" | tee "${OUT%.jsonl}.table.md"
"$PY" "$WRAP" summary "$OUT" "$STATS" | tee -a "${OUT%.jsonl}.table.md"
echo
echo "results: $OUT  node stats: $STATS  table: ${OUT%.jsonl}.table.md"
