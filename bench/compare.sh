#!/usr/bin/env bash
# bench/compare.sh — Starling vs Mosquitto (MQTT 3.1.1, QoS 1) under the same
# open-loop message workload, over a ladder of rates, like with like:
# plaintext vs plaintext and TLS 1.3 vs TLS 1.3 (Mosquitto gets Starling's
# certificate). Server(s) pinned to one core, the load generator to another.
#
# Writes bench/results/{compare.json,compare.md,latency.svg,throughput.svg}
# and the raw per-run reports in bench/results/runs/. Takes ~5.5 minutes with
# the defaults. Needs: mosquitto (apt-get install -y mosquitto), taskset.
#
# Knobs (environment): STARLING_RATES and MOSQUITTO_RATES (each system's ladder of offered
# rates; RATES sets both), PAIRS (2), INFLIGHT (1024), DURATION, BODY, TICK_US, TRANSPORTS ("plain tls"),
# SYSTEMS ("starling mosquitto"), BOUND_MS (the p99 bound of the table's yes/no column, 50),
# BOUNDS_MS (comma-separated p99 bounds at which each system's highest sustained rate is found
# and Starling's is divided by Mosquitto's, "1,2,5,10,25,50"), NOISE_SECS, SERVER_CPU,
# LOADGEN_CPU, OUT, STARLING, BENCH, SKIP_BUILD=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/bench-config.sh
. "$ROOT/bench/scripts/bench-config.sh"
# Each system's ladder: fine steps around where it tops out on this machine (2 pairs, window
# 1,024), so the highest rate within a bound is exact to a step (steps of 20k around Mosquitto's
# ceiling had overstated the ratio: docs/design/performance-decisions.md). Both ladders go past
# where each system saturated on 2026-12-03 (Mosquitto at 55-60k, Starling past 300k), so neither
# is credited with the top of its ladder. RATES, if given, is both ladders.
STARLING_RATES=${STARLING_RATES:-${RATES:-"50000 100000 150000 200000 225000 250000 275000 300000 325000 350000"}}
MOSQUITTO_RATES=${MOSQUITTO_RATES:-${RATES:-"10000 20000 25000 30000 35000 40000 45000 50000 55000 60000 65000 70000"}}
PAIRS=${PAIRS:-2}
# Unacknowledged sends per connection, the same for both systems: Starling is configured to
# allow it (limits.inflight_requests_max, whose default is 64) and the load generator keeps at most this
# many PUBLISHes unacknowledged on MQTT. A step whose sends waited for it is marked window-bound.
INFLIGHT=${INFLIGHT:-1024}
TICK_US=${TICK_US:-100}
DURATION=${DURATION:-6}
BODY=${BODY:-100}
TRANSPORTS=${TRANSPORTS:-"plain tls"}
SYSTEMS=${SYSTEMS:-"starling mosquitto"}
BOUND_MS=${BOUND_MS:-50}
NOISE_SECS=${NOISE_SECS:-5}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
OUT=${OUT:-$ROOT/bench/results}
STARLING=${STARLING:-$ROOT/target/release/starling}
BENCH=${BENCH:-$ROOT/target/release/starling-bench}
S_TLS=127.0.0.1:17443
S_PLAIN=127.0.0.1:17444
S_METRICS=127.0.0.1:17464
M_PLAIN=127.0.0.1:11883
M_TLS=127.0.0.1:18883

if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -p starling-bench -p starling-gateway --bin starling --bin starling-bench)
fi

TMP=$(mktemp -d /tmp/starling-compare.XXXXXX)
RUNS=$TMP/runs
mkdir -p "$RUNS"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

echo "== machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u)"

# --- Starling: one shard pinned to SERVER_CPU, fsync'd log, raised OTP limits for registration.
bench_server_config "$INFLIGHT" > "$TMP/starling.toml"
taskset -c "$SERVER_CPU" "$STARLING" serve --config "$TMP/starling.toml" --data-dir "$TMP/data" \
  --listen "$S_TLS" --dangerous-plaintext-listen "$S_PLAIN" --metrics-listen "$S_METRICS" --shards 1 \
  > "$TMP/starling.log" 2>&1 &
SPID=$!
PIDS+=("$SPID")
for _ in $(seq 100); do grep -q '^ready' "$TMP/starling.log" && break; sleep 0.1; done
grep -q '^ready' "$TMP/starling.log" || { cat "$TMP/starling.log"; echo "starling did not start"; exit 1; }
CA=$TMP/data/tls/ca.pem
"$BENCH" register --target "tls://$S_TLS" --data-dir "$TMP/data" --count $((2 * PAIRS)) \
  --out "$TMP/accounts.json" 2>/dev/null

# --- Mosquitto: same core, no persistence (its default), same certificate for TLS.
MPID=
if [[ " $SYSTEMS " == *" mosquitto "* ]]; then
  if ! command -v mosquitto >/dev/null; then
    echo "mosquitto is not installed (apt-get update && apt-get install -y mosquitto); skipping it"
  else
    mkdir -p "$TMP/mq"
    cp "$TMP/data/tls/server.pem" "$TMP/data/tls/server.key" "$TMP/mq/"
    # Mosquitto started as root drops to the mosquitto user: let it read the key copy.
    if id mosquitto >/dev/null 2>&1; then chown -R mosquitto "$TMP/mq"; chmod 755 "$TMP"; fi
    cat > "$TMP/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous true
persistence false
# Starling writes with TCP_NODELAY; without it Mosquitto meets delayed ACKs (40 ms stalls at low rates).
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
    taskset -c "$SERVER_CPU" mosquitto -c "$TMP/mosquitto.conf" > "$TMP/mosquitto.log" 2>&1 &
    MPID=$!
    PIDS+=("$MPID")
    sleep 0.5
    kill -0 "$MPID" 2>/dev/null || { cat "$TMP/mosquitto.log"; echo "mosquitto did not start"; exit 1; }
  fi
fi

# --- The machine's own stalls on the two cores, servers idle (5 s; a reader of a
# p99 needs to know how often the machine took a core away by itself).
NOISE_ARGS=()
if command -v python3 >/dev/null; then
  echo "== machine noise: $NOISE_SECS s per CPU (bench/scripts/hiccups.py)"
  python3 "$ROOT/bench/scripts/hiccups.py" --json "$TMP/noise.json" "$NOISE_SECS" "$SERVER_CPU" "$LOADGEN_CPU" \
    && NOISE_ARGS=(--noise "$TMP/noise.json")
fi

run() { # system transport target pid rate
  local system=$1 transport=$2 target=$3 pid=$4 rate=$5
  local own=()
  [[ $system == starling ]] && own=(--server-metrics "$S_METRICS")
  echo "== $system $transport: $rate msg/s"
  taskset -c "$LOADGEN_CPU" "$BENCH" messages --target "$target" --ca "$CA" "${own[@]}" \
    --accounts "$TMP/accounts.json" --pairs "$PAIRS" --rate "$rate" --duration-secs "$DURATION" \
    --drain-secs 3 --body-bytes "$BODY" --tick-us "$TICK_US" --inflight "$INFLIGHT" --server-pid "$pid" \
    --json "$RUNS/$system-$transport-$rate.json" 2>/dev/null | sed -n '/^target/,$p'
}

for transport in $TRANSPORTS; do
  for system in $SYSTEMS; do
    case "$system-$transport" in
      starling-plain) target=plain://$S_PLAIN pid=$SPID ;;
      starling-tls) target=tls://$S_TLS pid=$SPID ;;
      mosquitto-plain) target=mqtt://$M_PLAIN pid=$MPID ;;
      mosquitto-tls) target=mqtts://$M_TLS pid=$MPID ;;
      *) continue ;;
    esac
    [[ -n "$pid" ]] || continue
    case "$system" in
      starling) rates=$STARLING_RATES ;;
      *) rates=$MOSQUITTO_RATES ;;
    esac
    for rate in $rates; do
      if ! run "$system" "$transport" "$target" "$pid" "$rate"; then
        if grep -q UNAVAILABLE "$RUNS/$system-$transport-$rate.json" 2>/dev/null; then
          echo "   $system does not do messaging yet (UNAVAILABLE): skipping its other rates"
          break
        fi
      fi
    done
  done
done

mkdir -p "$OUT/runs"
cp "$RUNS"/*.json "$OUT/runs/"
"$BENCH" compare-report --runs "$RUNS" --out "$OUT" --bound-ms "$BOUND_MS" \
  --bounds-ms "${BOUNDS_MS:-1,2,5,10,25,50}" "${NOISE_ARGS[@]}"
echo "== load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
