#!/usr/bin/env bash
# bench/scripts/latency-runs.sh — the Send → SendAck latency measurement (BENCHMARKS.md, "Send →
# SendAck latency"; target p99 ≤ 1.5 ms at 100k msg/s), repeated: one Starling server
# (one shard, fsync on every batch), one `starling-bench messages` run after another at each
# rate, with the machine's own stalls measured before every run, and one summary line per run.
#
#   RUNS=10 RATES="100000 200000" bench/scripts/latency-runs.sh
#
# Placement (the shipped one unless told otherwise): the server is started under
# `taskset -c $SERVER_CPUS` (default "0,1": its shard pins itself to CPU 0 and its log writer
# to CPU 1, the CPU left over) and the load generator under `taskset -c $LOADGEN_CPU` (1).
# SERVER_CPUS=0 puts everything of the server on CPU 0, as bench/compare.sh does.
#
# Knobs: RUNS (5), RATES ("100000"), PAIRS (2), DURATION (8), INFLIGHT (1024, the server's
# limits.inflight_requests_max and so the load generator's window), TRANSPORT (plain|tls),
# EXTRA_TOML (appended to the server's config, e.g. "[storage]\ncommit_interval_min_us = 100"),
# NOISE_SECS (2; 0 skips the stall measurement), OUT (a directory for every run's JSON and
# timeline CSV; default: a temporary one, removed), STARLING, BENCH, SKIP_BUILD=1.
#
# Each line: rate, SendAck p50/p99/p99.9 and Deliver p99 in µs, the share of acks over
# 1.5 ms, both processes' CPU, and the stalls (> 1 ms) a spinning loop saw on each CPU in the
# NOISE_SECS before the run. Every loop is bounded: RUNS × RATES runs of DURATION seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench-config.sh
. "$ROOT/bench/scripts/bench-config.sh"
RUNS=${RUNS:-5}
RATES=${RATES:-100000}
PAIRS=${PAIRS:-2}
DURATION=${DURATION:-8}
INFLIGHT=${INFLIGHT:-1024}
TRANSPORT=${TRANSPORT:-plain}
SERVER_CPUS=${SERVER_CPUS:-0,1}
LOADGEN_CPU=${LOADGEN_CPU:-1}
NOISE_SECS=${NOISE_SECS:-2}
STARLING=${STARLING:-$ROOT/target/release/starling}
BENCH=${BENCH:-$ROOT/target/release/starling-bench}

if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -p starling-bench -p starling-gateway --bin starling --bin starling-bench)
fi

TMP=$(mktemp -d /tmp/starling-latency.XXXXXX)
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
SPID=
cleanup() {
  if [[ -n "$SPID" ]]; then kill "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

bench_server_config "$INFLIGHT" "${EXTRA_TOML:-}" > "$TMP/starling.toml"
taskset -c "$SERVER_CPUS" "$STARLING" serve --config "$TMP/starling.toml" --data-dir "$TMP/data" \
  --listen 127.0.0.1:27443 --dangerous-plaintext-listen 127.0.0.1:27444 \
  --metrics-listen 127.0.0.1:27445 --shards 1 > "$TMP/starling.log" 2>&1 &
SPID=$!
for _ in $(seq 100); do grep -q '^ready' "$TMP/starling.log" && break; sleep 0.1; done
grep -q '^ready' "$TMP/starling.log" || { cat "$TMP/starling.log"; echo "starling did not start" >&2; exit 1; }
"$BENCH" register --target plain://127.0.0.1:27444 --data-dir "$TMP/data" --count $((2 * PAIRS)) \
  --out "$TMP/accounts.json" > /dev/null 2>&1
if [[ $TRANSPORT == tls ]]; then target=tls://127.0.0.1:27443; else target=plain://127.0.0.1:27444; fi

echo "# $(date -u), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); server on CPUs $SERVER_CPUS, load generator on $LOADGEN_CPU; $PAIRS pairs, $TRANSPORT, ${DURATION} s per run"
echo "# rate    SendAck p50 p99 p99.9 us   Deliver p99 us   acks > 1.5 ms   server/loadgen CPU   stalls > 1 ms (CPU 0, 1)"
for i in $(seq "$RUNS"); do
  for rate in $RATES; do
    stalls="-"
    if [[ "$NOISE_SECS" != 0 ]] && command -v python3 > /dev/null; then
      python3 "$ROOT/bench/scripts/hiccups.py" --json "$TMP/noise.json" "$NOISE_SECS" 0 1 > /dev/null
      stalls=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(",".join(str(c["gaps_over_1ms"]) for c in d["cpus"]))' "$TMP/noise.json" 2>/dev/null || echo "?")
    fi
    json="$OUT/run-$i-$rate.json"
    taskset -c "$LOADGEN_CPU" "$BENCH" messages --target "$target" --ca "$TMP/data/tls/ca.pem" \
      --accounts "$TMP/accounts.json" --pairs "$PAIRS" --rate "$rate" --duration-secs "$DURATION" \
      --drain-secs 3 --server-pid "$SPID" --server-metrics 127.0.0.1:27445 \
      --json "$json" --timeline "$OUT/timeline-$i-$rate.csv" > /dev/null 2>&1 || true
    python3 - "$json" "$rate" "$stalls" <<'PY'
import json, sys
path, rate, stalls = sys.argv[1:]
try:
    o = json.load(open(path))["outcome"]
except Exception as e:
    print(f"{rate:>7}  run failed: {e}")
    sys.exit(0)
a, d, t = o["ack_us"], o["deliver_us"], o["ack_timeline"]
slow = 100.0 * t["slow_acks"] / max(t["acks"], 1)
cpu = o.get("server_cpu_cores") or 0.0
print(f"{rate:>7}  {a['p50_us']:>6} {a['p99_us']:>6} {a['p999_us']:>7}   {d['p99_us']:>13}   {slow:>12.2f}%   {cpu:>8.2f} / {o['loadgen_cpu_cores']:.2f}   {stalls:>14}")
PY
  done
done
