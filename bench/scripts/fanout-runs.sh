#!/usr/bin/env bash
# bench/scripts/fanout-runs.sh — group fan-out, Starling against Mosquitto in one go
# (BENCHMARKS.md, "Group fan-out"; target: a 1,000-member group, every member online over TLS,
# 20 group messages/s, p99 send → delivery to the last member ≤ 50 ms on one server core).
#
#   bench/scripts/fanout-runs.sh                          # 1 group of 1,000, 20 msg/s, TLS
#   RATES="20 40 80" RUNS=2 OUT=bench/results/fanout-x bench/scripts/fanout-runs.sh
#
# Each run is one `starling-bench fanout --target … --peer …`: Starling first, then Mosquitto
# with the same workload (one QoS 1 publisher per group, N − 1 subscribers per topic), in the
# same invocation. Placement as in bench/compare.sh: each server, every thread of it, under
# `taskset -c $SERVER_CPU` (0) — `starling serve --shards 1` and Mosquitto (single-threaded,
# `persistence false`, Starling's certificate for TLS) — and the load generator under
# `taskset -c $LOADGEN_CPU` (1). TLS against TLS (TRANSPORT=tls, the default) or plaintext
# against plaintext (TRANSPORT=plain). The machine's own stalls are measured before each run.
#
# Knobs: GROUP_SIZE (1000), NGROUPS (1), RATES ("20", group messages/s), RUNS (1), DURATION (10),
# TRANSPORT (tls|plain), PROCS (load-generator processes, 1; each holds at most 19,000
# connections), FANOUT_ARGS (more `starling-bench fanout` flags, e.g. "--no-delivery-acks"),
# EXTRA_TOML (appended to Starling's config, e.g. "[router]\ngroup_members_max = 5000"),
# SYSTEMS ("starling mosquitto"), NOISE_SECS (2; 0 skips), OUT (a directory for every run's
# JSON; default: a temporary one, removed), STARLING, BENCH, SKIP_BUILD=1.
#
# Needs (installs nothing): mosquitto (apt-get install -y mosquitto), taskset, python3 (the
# summary lines and the stall measurement). Every loop is bounded: RUNS × RATES runs of
# DURATION seconds, each phase of each run capped by `starling-bench fanout` itself.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench-config.sh
. "$ROOT/bench/scripts/bench-config.sh"
GROUP_SIZE=${GROUP_SIZE:-1000}
NGROUPS=${NGROUPS:-1}
RATES=${RATES:-20}
RUNS=${RUNS:-1}
DURATION=${DURATION:-10}
TRANSPORT=${TRANSPORT:-tls}
PROCS=${PROCS:-1}
SYSTEMS=${SYSTEMS:-"starling mosquitto"}
NOISE_SECS=${NOISE_SECS:-2}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
STARLING=${STARLING:-$ROOT/target/release/starling}
BENCH=${BENCH:-$ROOT/target/release/starling-bench}
S_TLS=127.0.0.1:37443
S_PLAIN=127.0.0.1:37444
M_PLAIN=127.0.0.1:31883
M_TLS=127.0.0.1:38883

if [[ " $SYSTEMS " == *" mosquitto "* ]] && ! command -v mosquitto > /dev/null; then
  echo "mosquitto is not installed (apt-get install -y mosquitto), or run with SYSTEMS=starling" >&2
  exit 1
fi
if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -p starling-bench -p starling-gateway --bin starling --bin starling-bench)
fi

TMP=$(mktemp -d /tmp/starling-fanout.XXXXXX)
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2> /dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# Starling: one shard, every thread on SERVER_CPU; OTP limits raised for registration.
bench_server_config 64 "${EXTRA_TOML:-}" > "$TMP/starling.toml"
taskset -c "$SERVER_CPU" "$STARLING" serve --config "$TMP/starling.toml" --data-dir "$TMP/data" \
  --listen "$S_TLS" --dangerous-plaintext-listen "$S_PLAIN" --metrics-listen off --shards 1 \
  > "$TMP/starling.log" 2>&1 &
SPID=$!
PIDS+=("$SPID")
for _ in $(seq 100); do grep -q '^ready' "$TMP/starling.log" && break; sleep 0.1; done
grep -q '^ready' "$TMP/starling.log" || { cat "$TMP/starling.log"; echo "starling did not start" >&2; exit 1; }
CA=$TMP/data/tls/ca.pem
"$BENCH" register --target "plain://$S_PLAIN" --data-dir "$TMP/data" --count $((NGROUPS * GROUP_SIZE)) \
  --out "$TMP/accounts.json" > /dev/null 2>&1
if [[ $TRANSPORT == tls ]]; then target=tls://$S_TLS peer=mqtts://$M_TLS; else target=plain://$S_PLAIN peer=mqtt://$M_PLAIN; fi

# Mosquitto: the same core, no persistence (its default), Starling's certificate for TLS.
SYSTEM_ARGS=(--target "$target" --server-pid "$SPID")
if [[ " $SYSTEMS " == *" mosquitto "* ]]; then
  mkdir -p "$TMP/mq"
  cp "$TMP/data/tls/server.pem" "$TMP/data/tls/server.key" "$TMP/mq/"
  # Mosquitto started as root drops to the mosquitto user: let it read the key copy.
  if id mosquitto > /dev/null 2>&1; then chown -R mosquitto "$TMP/mq"; chmod 755 "$TMP"; fi
  cat > "$TMP/mosquitto.conf" << EOF
per_listener_settings false
allow_anonymous true
persistence false
set_tcp_nodelay true
max_inflight_messages 0
max_queued_messages 0
log_dest stderr
log_type error
log_type warning
listener ${M_PLAIN##*:} ${M_PLAIN%:*}
listener ${M_TLS##*:} ${M_TLS%:*}
certfile $TMP/mq/server.pem
keyfile $TMP/mq/server.key
tls_version tlsv1.3
EOF
  # Mosquitto needs a file descriptor per connection.
  (ulimit -n 20000 && exec taskset -c "$SERVER_CPU" mosquitto -c "$TMP/mosquitto.conf") > "$TMP/mosquitto.log" 2>&1 &
  MPID=$!
  PIDS+=("$MPID")
  sleep 0.5
  kill -0 "$MPID" 2> /dev/null || { cat "$TMP/mosquitto.log"; echo "mosquitto did not start" >&2; exit 1; }
  SYSTEM_ARGS+=(--peer "$peer" --peer-pid "$MPID")
fi
[[ " $SYSTEMS " == *" starling "* ]] || SYSTEM_ARGS+=(--peer-only)

echo "# $(date -u), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); servers on CPU $SERVER_CPU, load generator on $LOADGEN_CPU; $NGROUPS group(s) of $GROUP_SIZE, $TRANSPORT, ${DURATION} s per run, commit $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?')"
echo "# system    msg/s  deliveries/s  deliver p50 p99 us  last-member p50 p99 us  ack p99 us  server CPU  loadgen CPU  missing  stalls > 1 ms (CPU $SERVER_CPU, $LOADGEN_CPU)"
for i in $(seq "$RUNS"); do
  for rate in $RATES; do
    stalls="-"
    if [[ "$NOISE_SECS" != 0 ]] && command -v python3 > /dev/null; then
      python3 "$ROOT/bench/scripts/hiccups.py" --json "$TMP/noise.json" "$NOISE_SECS" "$SERVER_CPU" "$LOADGEN_CPU" > /dev/null
      stalls=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(",".join(str(c["gaps_over_1ms"]) for c in d["cpus"]))' "$TMP/noise.json" 2> /dev/null || echo "?")
    fi
    json="$OUT/fanout-$NGROUPS-$GROUP_SIZE-$rate-$TRANSPORT-$i.json"
    # shellcheck disable=SC2086 # FANOUT_ARGS is a list of flags
    taskset -c "$LOADGEN_CPU" "$BENCH" fanout "${SYSTEM_ARGS[@]}" --ca "$CA" \
      --accounts "$TMP/accounts.json" --group-size "$GROUP_SIZE" --groups "$NGROUPS" --rate "$rate" \
      --duration-secs "$DURATION" --procs "$PROCS" --json "$json" ${FANOUT_ARGS:-} \
      > "$OUT/fanout-$NGROUPS-$GROUP_SIZE-$rate-$TRANSPORT-$i.txt" 2> "$TMP/stderr" \
      || tail -c 4000 "$TMP/stderr" >> "$OUT/fanout-$NGROUPS-$GROUP_SIZE-$rate-$TRANSPORT-$i.txt"
    python3 - "$json" "$rate" "$stalls" << 'PY'
import json, sys
path, rate, stalls = sys.argv[1:]
try:
    outcomes = json.load(open(path))["outcomes"]
except Exception as e:
    print(f"{'?':<9} {rate:>6}  run failed ({e}): see the .txt beside the JSON")
    sys.exit(0)
for o in outcomes:
    d, l, a = o["deliver_us"], o["last_member_us"], o["ack_us"]
    cpu = o.get("server_cpu_cores") or 0.0
    print(f"{o['system']:<9} {rate:>6}  {o['deliveries_per_s']:>12.0f}  {d['p50_us']:>8} {d['p99_us']:>8}  {l['p50_us']:>11} {l['p99_us']:>9}  {a['p99_us']:>10}  {cpu:>10.2f}  {o['loadgen_cpu_cores']:>11.2f}  {o['missing']:>7}  {stalls:>8}")
PY
  done
done
