#!/usr/bin/env bash
# bench/scripts/retention-steady.sh — disk use under a constant load with the server's retention
# (issue 37 §4; BENCHMARKS.md "The store at scale"): one release `starling` with
# `storage.retention_secs = RETENTION_SECS` (default 3600), PAIRS pairs sending RATE 200-byte
# messages a second for DURATION seconds through `starling-bench messages`, and every
# SAMPLE_SECS the bytes of the data directory's parts (log segments, index files, metadata) and
# the server's counters of removed segments, into OUT/disk.csv. The summary compares the
# largest log size of the last quarter of the run with that of the quarter before it: a steady
# state holds them equal within a segment per shard.
#
#   RATE=2000 DURATION=5400 bench/scripts/retention-steady.sh          # 90 min, 1-hour retention
#   RETENTION_SECS=120 RATE=2000 DURATION=600 SKIP_BUILD=1 bench/scripts/retention-steady.sh
#
# Bounded: the load stops after DURATION seconds (one process, `--duration-secs`); the script
# stops only the server it started. The data directory is removed at the end unless KEEP_DATA=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench-config.sh
. "$ROOT/bench/scripts/bench-config.sh"
RETENTION_SECS=${RETENTION_SECS:-3600}
SWEEP_MS=${SWEEP_MS:-60000}
RATE=${RATE:-2000}
PAIRS=${PAIRS:-50}
DURATION=${DURATION:-5400}
SAMPLE_SECS=${SAMPLE_SECS:-60}
SHARDS=${SHARDS:-2}
BODY=${BODY:-200}
DATA_ROOT=${DATA_ROOT:-/tmp}
STARLING=${STARLING:-$ROOT/target/release/starling}
BENCH=${BENCH:-$ROOT/target/release/starling-bench}
PLAIN=127.0.0.1:37844
TLS=127.0.0.1:37843
METRICS=127.0.0.1:37890

if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -j2 -p starling-bench -p starling-gateway --bin starling --bin starling-bench)
fi
TMP=$(mktemp -d "$DATA_ROOT/starling-retention.XXXXXX")
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
SPID=
LPID=
cleanup() {
  if [[ -n "$LPID" ]]; then kill "$LPID" 2> /dev/null || true; wait "$LPID" 2> /dev/null || true; fi
  if [[ -n "$SPID" ]]; then kill "$SPID" 2> /dev/null || true; wait "$SPID" 2> /dev/null || true; fi
  if [[ -z "${KEEP_DATA:-}" ]]; then rm -rf "$TMP/data"; fi
}
trap cleanup EXIT

bench_server_config 256 "[storage]\nretention_secs = $RETENTION_SECS\nretention_sweep_ms = $SWEEP_MS" \
  > "$TMP/starling.toml"
"$STARLING" serve --config "$TMP/starling.toml" --data-dir "$TMP/data" --listen "$TLS" \
  --dangerous-plaintext-listen "$PLAIN" --metrics-listen "$METRICS" --shards "$SHARDS" \
  > "$OUT/starling.log" 2>&1 &
SPID=$!
for _ in $(seq 300); do grep -q '^ready' "$OUT/starling.log" && break; sleep 0.1; done
grep -q '^ready' "$OUT/starling.log" || { cat "$OUT/starling.log"; echo "starling did not start" >&2; exit 1; }
"$BENCH" register --target "plain://$PLAIN" --data-dir "$TMP/data" --count $((2 * PAIRS)) \
  --out "$TMP/accounts.json" > "$OUT/register.txt" 2>&1 || { cat "$OUT/register.txt"; exit 1; }

echo "# $(date -u), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); commit $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?'); retention ${RETENTION_SECS} s, sweep ${SWEEP_MS} ms, $SHARDS shards, $PAIRS pairs, $RATE msg/s of $BODY B for $DURATION s"
"$BENCH" messages --target "plain://$PLAIN" --ca "$TMP/data/tls/ca.pem" --accounts "$TMP/accounts.json" \
  --pairs "$PAIRS" --rate "$RATE" --duration-secs "$DURATION" --body-bytes "$BODY" --drain-secs 5 \
  --json "$OUT/messages.json" > "$OUT/messages.txt" 2>&1 &
LPID=$!

# Bytes of the files under the data directory, by part: log segments (*.log under log
# directories, the spare included), index files, everything else (metadata, accounts, keys, TLS).
sizes() {
  python3 - "$TMP/data" <<'PY'
import os, sys
log = ix = other = 0
segs = 0
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        p = os.path.join(d, f)
        try:
            n = os.stat(p).st_blocks * 512
        except FileNotFoundError:
            continue
        if os.path.basename(d) == "log":
            log += n
            segs += f.endswith(".seg")
        elif os.path.basename(d) == "index":
            ix += n
        else:
            other += n
print(log, segs, ix, other)
PY
}
metric() {
  curl -s "http://$METRICS/metrics" | awk -v m="$1" '$1 ~ "^"m {s += $2} END {printf "%d", s}'
}

echo "elapsed_s,log_bytes,segments,index_bytes,other_bytes,removed_segments,removed_bytes,rss_kib" > "$OUT/disk.csv"
START=$(date +%s)
while kill -0 "$LPID" 2> /dev/null; do
  now=$(($(date +%s) - START))
  read -r log segs ix other < <(sizes)
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$SPID/status")
  echo "$now,$log,$segs,$ix,$other,$(metric starling_retention_removed_segments_total),$(metric starling_retention_removed_bytes_total),$rss" >> "$OUT/disk.csv"
  if ((now > DURATION + 120)); then break; fi
  sleep "$SAMPLE_SECS"
done
wait "$LPID" || true
LPID=
python3 - "$OUT/disk.csv" "$DURATION" "$RETENTION_SECS" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
dur = int(sys.argv[2])
ret = int(sys.argv[3])
gib = lambda b: int(b) / 2**30
print(f"samples: {len(rows)}; last: {rows[-1]['elapsed_s']} s")
for r in rows[:: max(1, len(rows) // 24)] + [rows[-1]]:
    print(f"  t={int(r['elapsed_s']):>5} s  log {gib(r['log_bytes']):6.2f} GiB in {r['segments']:>3} segments"
          f"  index {gib(r['index_bytes']):5.2f} GiB  other {gib(r['other_bytes']):5.2f} GiB"
          f"  removed {r['removed_segments']} segments  RSS {int(r['rss_kib']) // 1024} MiB")
q = [r for r in rows if int(r["elapsed_s"]) <= dur]
n = len(q)
if n >= 8:
    a = q[n // 2 : 3 * n // 4]
    b = q[3 * n // 4 :]
    ma = max(int(r["log_bytes"]) for r in a)
    mb = max(int(r["log_bytes"]) for r in b)
    print(f"largest log, third quarter {gib(ma):.2f} GiB, last quarter {gib(mb):.2f} GiB (retention {ret} s)")
PY
echo "CSV: $OUT/disk.csv"
