#!/usr/bin/env bash
# The shared yardstick (../shared/bench) against one Shoal node, open and secured, in one
# run (a benchmark, not a test): "open" is the default node; "secured" loads a password
# file (100 users) and an ACL file (100 user sections, an anonymous section that grants the
# yardstick's topics, %c and %u patterns), so that every PUBLISH and SUBSCRIBE of the
# yardstick's (anonymous) clients is checked against the ACL. Node on CPU 0, the generator
# on CPU 1; the two targets alternate per repetition.
#
#   bench/secured_bench.sh            # REPEAT=3 DURATION=10 by default
# Needs: make test (the .venv), ../shared/bench, /tmp/bench-venv (see its README).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
RUN="${RUN:-$HERE/../shared/bench/run_anchors.sh}"
WORK="${WORK:-/tmp/shoal-secured-bench}"
REPEAT="${REPEAT:-3}"
export DURATION="${DURATION:-10}"
export SCENARIOS="${SCENARIOS:-fanin_qos0 fanin_qos1 fanin_qos1_e2e fanout_qos0 latency_qos1 conn_storm}"
export OUT="${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S).jsonl}"
rm -rf "$WORK"; mkdir -p "$WORK"

# 100 users (3 written by `shoal passwd`, the rest the same hash under other names: the
# yardstick logs in anonymously, so only the file's size matters)
"$HERE/.venv/bin/python" -m cluster passwd -b "$WORK/passwd" user-0 "pw-0" > /dev/null
hash="$(cut -d: -f2- "$WORK/passwd")"
for i in $(seq 1 99); do echo "user-$i:$hash" >> "$WORK/passwd"; done
{
  echo "topic readwrite bench/#"          # anonymous clients: the yardstick's topics
  for i in $(seq 0 99); do
    printf 'user user-%d\ntopic readwrite users/%d/#\ntopic read public/#\n' "$i" "$i"
  done
  echo "pattern readwrite devices/%c/#"
  echo "pattern read inbox/%u"
} > "$WORK/acl"

NODE="$HERE/.venv/bin/python -m node run --host 127.0.0.1 --mqtt-port 18833 --admin-port 0 --log-level warning"
run_open() {
  OURS_LABEL=shoal-open TARGETS=shoal-open REPEAT=1 \
    OURS_CMD="$NODE --data-dir $WORK/data-open" bash "$RUN" | grep -E "^  rep" || true
}
run_secured() {
  OURS_LABEL=shoal-secured TARGETS=shoal-secured REPEAT=1 \
    OURS_CMD="$NODE --data-dir $WORK/data-secured --password-file $WORK/passwd --acl-file $WORK/acl --allow-anonymous true" \
    bash "$RUN" | grep -E "^  rep" || true
}
for rep in $(seq "$REPEAT"); do  # (which goes first alternates: no order effect)
  if [ $((rep % 2)) = 1 ]; then run_open; run_secured; else run_secured; run_open; fi
done
/tmp/bench-venv/bin/python "$(dirname "$RUN")/mqttbench.py" report "$OUT"
