#!/usr/bin/env bash
# bench/scripts/large-group.sh — what a message to a 100,000-member group (fan-out on read)
# costs the server, against a 1:1 message, in one go (BENCHMARKS.md, "A 100,000-member group";
# target: server CPU per message within 2x that of a 1:1 message).
#
#   bench/scripts/large-group.sh                                    # 100,000 members, 200 msg/s
#   GROUP_SIZE=20000 ONLINE="2 1000" RATE=500 bench/scripts/large-group.sh
#
# One server (`starling serve --shards 1`, every thread on CPU $SERVER_CPU), the load generator on
# $LOADGEN_CPU, TLS. GROUP_SIZE + 2 accounts are registered first (on tmpfs, then copied to disk
# for the measured server). Then, each for DURATION seconds at
# RATE messages/s, open loop, 100-byte bodies:
#   1:1      `starling-bench messages --pairs 1`: two users send to each other (RATE in total);
#   group M  `starling-bench fanout --group-size GROUP_SIZE --online M`: one sender to a group of
#            GROUP_SIZE members of whom M (the sender included) are connected; they get coalesced
#            MessagesAvailable hints and Sync (each run creates its own group).
# Each line: the server's CPU over the sending window (cores, from /proc), and per message (µs);
# for the group runs also how the M − 1 online receivers got the messages.
#
# Knobs: GROUP_SIZE (100000), ONLINE ("2 2000"), RATE (200), RUNS (1: the 1:1 run and each
# group run, in turn), DURATION (10), PROCS (1; the fanout
# load generator's processes), OUT (a directory for every run's JSON; default: a temporary one),
# STARLING, BENCH, SKIP_BUILD=1. Every phase is bounded (registration by its count, each run by
# `starling-bench` itself); the script stops by itself.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench-config.sh
. "$ROOT/bench/scripts/bench-config.sh"
GROUP_SIZE=${GROUP_SIZE:-100000}
ONLINE=${ONLINE:-"2 2000"}
RUNS=${RUNS:-1}
RATE=${RATE:-200}
DURATION=${DURATION:-10}
PROCS=${PROCS:-1}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
STARLING=${STARLING:-$ROOT/target/release/starling}
BENCH=${BENCH:-$ROOT/target/release/starling-bench}
S_TLS=127.0.0.1:47443
S_PLAIN=127.0.0.1:47444

if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -p starling-bench -p starling-gateway --bin starling --bin starling-bench)
fi
TMP=$(mktemp -d /tmp/starling-large-group.XXXXXX)
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
SPID=
cleanup() {
  if [[ -n "$SPID" ]]; then kill "$SPID" 2> /dev/null || true; wait "$SPID" 2> /dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

bench_server_config 64 "[router]\ngroup_members_max = $GROUP_SIZE" > "$TMP/starling.toml"
# serve DATA_DIR: starts the server on it (every thread on SERVER_CPU), waits for "ready".
serve() {
  taskset -c "$SERVER_CPU" "$STARLING" serve --config "$TMP/starling.toml" --data-dir "$1" \
    --listen "$S_TLS" --dangerous-plaintext-listen "$S_PLAIN" --metrics-listen off --shards 1 \
    > "$TMP/starling.log" 2>&1 &
  SPID=$!
  for _ in $(seq 100); do grep -q '^ready' "$TMP/starling.log" && break; sleep 0.1; done
  grep -q '^ready' "$TMP/starling.log" || { cat "$TMP/starling.log"; echo "starling did not start" >&2; exit 1; }
}
# Registration commits every account step with an fsync (~35 accounts/s here): it runs on a
# data dir in tmpfs, which is then copied to disk, where the measured server runs.
SHM=$(mktemp -d /dev/shm/starling-large-group.XXXXXX)
trap 'cleanup; rm -rf "$SHM"' EXIT
serve "$SHM/data"
t0=$(date +%s)
"$BENCH" register --target "plain://$S_PLAIN" --data-dir "$SHM/data" --count $((GROUP_SIZE + 2)) \
  --out "$TMP/accounts.json" > "$OUT/register.txt" 2>&1
kill "$SPID"
wait "$SPID" 2> /dev/null || true
SPID=
cp -a "$SHM/data" "$TMP/data"
rm -rf "$SHM"
serve "$TMP/data"
CA=$TMP/data/tls/ca.pem
# The 1:1 pair: the two accounts after the group's.
python3 - "$TMP/accounts.json" "$TMP/pair.json" "$GROUP_SIZE" << 'PY'
import json, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
a = json.load(open(src))
a["accounts"] = a["accounts"][n:n + 2]
json.dump(a, open(dst, "w"))
PY
echo "# $(date -u), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); server on CPU $SERVER_CPU, load generator on $LOADGEN_CPU; TLS, $RATE msg/s, ${DURATION} s per run, commit $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?'); $((GROUP_SIZE + 2)) accounts registered in $(($(date +%s) - t0)) s"
echo "# run               server CPU  per message  receivers: deliveries/s  deliver p50 p99 us  hints  syncs  missing"

for i in $(seq "$RUNS"); do
  taskset -c "$LOADGEN_CPU" "$BENCH" messages --target "tls://$S_TLS" --ca "$CA" \
    --accounts "$TMP/pair.json" --pairs 1 --rate "$RATE" --duration-secs "$DURATION" \
    --drain-secs 3 --server-pid "$SPID" --json "$OUT/one-to-one-$i.json" > "$OUT/one-to-one-$i.txt" 2>&1 || true
  for m in $ONLINE; do
    taskset -c "$LOADGEN_CPU" "$BENCH" fanout --target "tls://$S_TLS" --ca "$CA" \
      --accounts "$TMP/accounts.json" --group-size "$GROUP_SIZE" --online "$m" --rate "$RATE" \
      --duration-secs "$DURATION" --setup-secs 600 --procs "$PROCS" --server-pid "$SPID" \
      --json "$OUT/group-$m-$i.json" > "$OUT/group-$m-$i.txt" 2>&1 || true
  done
done
python3 - "$OUT" "$RATE" "$RUNS" $ONLINE << 'PY'
import json, os, sys
out, rate, runs, online = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def line(name, cpu, extra=""):
    if cpu is None:
        print(f"{name:<18} run failed: see {out}")
        return
    print(f"{name:<18} {cpu:>10.3f}  {cpu * 1e6 / rate:>8.1f} us  {extra}")
for i in range(1, runs + 1):
    try:
        o = json.load(open(os.path.join(out, f"one-to-one-{i}.json")))["outcome"]
        line(f"1:1 #{i}", o.get("server_cpu_cores"))
    except Exception as e:
        print(f"1:1 #{i}             run failed ({e})")
    for m in online:
        try:
            o = json.load(open(os.path.join(out, f"group-{m}-{i}.json")))["outcomes"][0]
        except Exception as e:
            print(f"group {m} online #{i}  run failed ({e})")
            continue
        d, c = o["deliver_us"], o["counts"]
        lg = " (load generator saturated)" if o.get("loadgen_cpu_cores", 0) > 0.85 else ""
        extra = f"{o['deliveries_per_s']:>21.0f}  {d['p50_us']:>8} {d['p99_us']:>9}  {c['hints']:>5}  {c['syncs']:>5}  {o['missing']:>7}{lg}"
        line(f"group {m} online #{i}", o.get("server_cpu_cores"), extra)
PY
