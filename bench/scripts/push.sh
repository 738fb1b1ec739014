#!/usr/bin/env bash
# bench/scripts/push.sh — push notifications per second through the notifier to a local APNs,
# and the 1:1 message path's latency with and without that load (BENCHMARKS.md, "Push
# notifications"; target: at least 20,000 notifications/s queued and sent, with the message
# path's p99 unchanged within noise).
#
#   bench/scripts/push.sh                        # 20 groups of 1,000 offline members, 20 msg/s
#   RATE=30 RUNS=3 SKIP_BUILD=1 bench/scripts/push.sh
#
# One server (`starling serve --shards 2`, plaintext listener), its `[push.apns]` pointed at a
# local APNs that `starling-bench push` serves (HTTP/2 over TLS with its own CA; `--prepare`
# makes the material first), `push.grace_ms = 50` and `push.collapse_ms = 0` (so every message
# owes a notification to every offline member: a throughput test of the notifier, not of
# collapsing). RECIPIENTS + 1 + 2 × PAIRS accounts are registered first (on tmpfs, then copied to
# disk for the measured server). Then RUNS times, in turn:
#   alone  `starling-bench messages --pairs PAIRS --rate MSG_RATE` for DURATION s;
#   push   `starling-bench push` (RECIPIENTS offline accounts with an APNs token, GROUPS groups of
#          GROUP_SIZE of them, RATE group messages/s for PUSH_SECS), and the same `messages` run
#          while it sends (starting WARMUP s into it).
# The push load generator runs as SCHED_IDLE: its local APNs stands in for Apple's servers, which
# in production are not on the server's CPUs. Each run's JSON goes to OUT. Every phase is bounded by its own count and time; the script
# stops by itself.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench-config.sh
. "$ROOT/bench/scripts/bench-config.sh"
RECIPIENTS=${RECIPIENTS:-1000}
GROUPS_N=${GROUP_COUNT:-20}
GROUP_SIZE=${GROUP_SIZE:-1000}
RATE=${RATE:-20}
PAIRS=${PAIRS:-50}
MSG_RATE=${MSG_RATE:-2000}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-6}
PUSH_SECS=${PUSH_SECS:-$((DURATION + 2 * WARMUP))}
RUNS=${RUNS:-1}
SENDERS=${SENDERS:-64}
STARLING=${STARLING:-$ROOT/target/release/starling}
BENCH=${BENCH:-$ROOT/target/release/starling-bench}
S_PLAIN=127.0.0.1:47644
S_TLS=127.0.0.1:47643
METRICS=127.0.0.1:47690
APNS=127.0.0.1:47790

if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -p starling-bench -p starling-gateway --bin starling --bin starling-bench)
fi
TMP=$(mktemp -d /tmp/starling-push.XXXXXX)
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
SPID=
SHM=
cleanup() {
  if [[ -n "$SPID" ]]; then kill "$SPID" 2> /dev/null || true; wait "$SPID" 2> /dev/null || true; fi
  rm -rf "$TMP"
  if [[ -n "$SHM" ]]; then rm -rf "$SHM"; fi
}
trap cleanup EXIT

"$BENCH" push --prepare --endpoint-dir "$TMP/apns" > /dev/null
bench_server_config 64 "[push]
grace_ms = 50
collapse_ms = 0
senders = $SENDERS
ca_file = \"$TMP/apns/tls/ca.pem\"

[push.apns]
team_id = \"BENCHTEAM1\"
key_id = \"BENCHKEY01\"
key_file = \"$TMP/apns/AuthKey.p8\"
endpoint = \"https://$APNS\"
sandbox_endpoint = \"https://$APNS\"" > "$TMP/starling.toml"
# serve DATA_DIR: starts the server on it and waits for "ready".
serve() {
  "$STARLING" serve --config "$TMP/starling.toml" --data-dir "$1" --listen "$S_TLS" \
    --dangerous-plaintext-listen "$S_PLAIN" --metrics-listen "$METRICS" --shards 2 \
    > "$TMP/starling.log" 2>&1 &
  SPID=$!
  for _ in $(seq 100); do grep -q '^ready' "$TMP/starling.log" && break; sleep 0.1; done
  grep -q '^ready' "$TMP/starling.log" || { cat "$TMP/starling.log"; echo "starling did not start" >&2; exit 1; }
}
# Registration commits every account step with an fsync: it runs on tmpfs, then the data dir
# is copied to disk, where the measured server runs.
SHM=$(mktemp -d /dev/shm/starling-push.XXXXXX)
serve "$SHM/data"
COUNT=$((RECIPIENTS + 1 + 2 * PAIRS))
"$BENCH" register --target "plain://$S_PLAIN" --data-dir "$SHM/data" --count "$COUNT" \
  --out "$TMP/accounts.json" > "$OUT/register.txt" 2>&1
kill "$SPID"
wait "$SPID" 2> /dev/null || true
SPID=
cp -a "$SHM/data" "$TMP/data"
rm -rf "$SHM"
SHM=
serve "$TMP/data"
python3 - "$TMP/accounts.json" "$TMP/pairs.json" "$((RECIPIENTS + 1))" << 'PY'
import json, sys
a = json.load(open(sys.argv[1]))
n = int(sys.argv[3])
a["accounts"] = a["accounts"][n:]
json.dump(a, open(sys.argv[2], "w"))
PY

echo "# $(date -u), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); commit $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?'); $GROUPS_N groups of $GROUP_SIZE offline members, $RATE msg/s; messages: $PAIRS pairs at $MSG_RATE msg/s for $DURATION s"
messages() { # JSON
  "$BENCH" messages --target "plain://$S_PLAIN" --accounts "$TMP/pairs.json" --pairs "$PAIRS" \
    --rate "$MSG_RATE" --duration-secs "$DURATION" --warmup-secs 1 --server-pid "$SPID" \
    --json "$1" > /dev/null 2>&1
}
p99() { python3 -c 'import json,sys; o=json.load(open(sys.argv[1]))["outcome"]; print(round(o["ack_us"]["p99_us"]/1000, 2), "ms, deliver", round(o["deliver_us"]["p99_us"]/1000, 2))' "$1" 2> /dev/null || echo '?'; }
for r in $(seq "$RUNS"); do
  messages "$OUT/alone-$r.json"
  echo "run $r alone: message path p99 SendAck $(p99 "$OUT/alone-$r.json") ms"
  chrt --idle 0 "$BENCH" push --endpoint-dir "$TMP/apns" --endpoint-listen "$APNS" --target "plain://$S_PLAIN" \
    --accounts "$TMP/accounts.json" --recipients "$RECIPIENTS" --groups "$GROUPS_N" \
    --group-size "$GROUP_SIZE" --rate "$RATE" --secs "$PUSH_SECS" --warmup-secs "$WARMUP" \
    --server-pid "$SPID" --server-metrics "$METRICS" --json "$OUT/push-$r.json" \
    > "$OUT/push-$r.txt" 2>&1 &
  BPID=$!
  # The push run registers its tokens and creates its groups first: start the messages run
  # once it sends (its first notification is due WARMUP s in).
  for _ in $(seq 600); do
    tr '\r' '\n' < "$OUT/push-$r.txt" | grep -q '^push: sending' && break
    sleep 0.1
  done
  sleep "$WARMUP"
  messages "$OUT/with-push-$r.json"
  wait "$BPID" || { cat "$OUT/push-$r.txt"; exit 1; }
  echo "run $r with push: message path p99 SendAck $(p99 "$OUT/with-push-$r.json") ms; $(tr '\r' '\n' < "$OUT/push-$r.txt" | grep -E '^push:|server CPU' | tr '\n' ' ')"
done
echo "JSON: $OUT"
