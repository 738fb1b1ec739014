#!/usr/bin/env bash
# bench/scripts/store-scale.sh — the embedded store at scale (issue 37, BENCHMARKS.md "The store
# at scale"): `starling-bench store-scale` against the release `starling` it starts itself.
#
#   bench/scripts/store-scale.sh                                   # 100 M messages, 1 M conversations
#   MESSAGES=2000000 CONVERSATIONS=100000 SKIP_BUILD=1 bench/scripts/store-scale.sh
#
# 100 M messages need ~30 GB of disk (DATA_ROOT, default /tmp) and hours; start small. The tool
# registers SENDERS + ⌈CONVERSATIONS / SENDERS⌉ accounts (REGISTER_ON_TMPFS=1, the default: on a
# server on /dev/shm first, whose data directory is then copied to DATA_ROOT, since every
# account step is an fsync), fills MESSAGES 200-byte messages into CONVERSATIONS direct
# conversations with a Zipf (s = 1) popularity, samples the server's RSS and disk, times Sync,
# GetHistory and Send into cold and hot conversations (OPS each), then SIGKILL → ready and
# SIGTERM → ready, checking VERIFY conversations after each restart.
#
# The config is bench/scripts/bench-config.sh's with `limits.inflight_requests_max = INFLIGHT`
# and `storage.index_memory_bytes = INDEX_MEMORY_BYTES` (default 1 GiB; 0 leaves the key out;
# a server that refuses the key as unknown gets the config without it, and the run says so).
# The data directory and the accounts file are deleted at the end unless KEEP_DATA=1; the report
# (OUT, default $TMP/out: store-scale.json, the server's log) stays. Everything is bounded: the
# fill by FILL_SECS, each start by READY_TIMEOUT_SECS; the tool stops (or kills) only the server
# it started.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench-config.sh
. "$ROOT/bench/scripts/bench-config.sh"
MESSAGES=${MESSAGES:-100000000}
CONVERSATIONS=${CONVERSATIONS:-1000000}
SENDERS=${SENDERS:-50}
INFLIGHT=${INFLIGHT:-256}
OPS=${OPS:-2000}
VERIFY=${VERIFY:-600}
SHARDS=${SHARDS:-2}
FILL_SECS=${FILL_SECS:-21600}
READY_TIMEOUT_SECS=${READY_TIMEOUT_SECS:-600}
SAMPLE_SECS=${SAMPLE_SECS:-5}
INDEX_MEMORY_BYTES=${INDEX_MEMORY_BYTES:-1073741824}
REGISTER_ON_TMPFS=${REGISTER_ON_TMPFS:-1}
DATA_ROOT=${DATA_ROOT:-/tmp}
STARLING=${STARLING:-$ROOT/target/release/starling}
BENCH=${BENCH:-$ROOT/target/release/starling-bench}
S_PLAIN=127.0.0.1:47844
S_TLS=127.0.0.1:47843
METRICS=127.0.0.1:47890

if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -j2 -p starling-bench -p starling-gateway --bin starling --bin starling-bench)
fi
TMP=$(mktemp -d "$DATA_ROOT/starling-store-scale.XXXXXX")
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
SPID=
SHM=
cleanup() {
  if [[ -n "$SPID" ]]; then kill "$SPID" 2> /dev/null || true; wait "$SPID" 2> /dev/null || true; fi
  if [[ -n "$SHM" ]]; then rm -rf "$SHM"; fi
  if [[ -z "${KEEP_DATA:-}" ]]; then rm -rf "$TMP/data" "$TMP/accounts.json"; fi
}
trap cleanup EXIT

EXTRA=""
if [[ "$INDEX_MEMORY_BYTES" != 0 ]]; then
  EXTRA="[storage]\nindex_memory_bytes = $INDEX_MEMORY_BYTES"
fi
bench_server_config "$INFLIGHT" "$EXTRA" > "$TMP/starling.toml"

ACCOUNTS=$((SENDERS + (CONVERSATIONS + SENDERS - 1) / SENDERS))
# The same server on /dev/shm first: whether it takes the config, and (REGISTER_ON_TMPFS=1) to
# register the accounts, as every account step is an fsync; its data directory (accounts and
# keys, no messages) is then copied to disk for the measured server.
SHM=$(mktemp -d /dev/shm/starling-store-scale.XXXXXX)
serve_shm() {
  "$STARLING" serve --config "$TMP/starling.toml" --data-dir "$SHM/data" --listen "$S_TLS" \
    --dangerous-plaintext-listen "$S_PLAIN" --metrics-listen "$METRICS" --shards "$SHARDS" \
    > "$TMP/register-server.log" 2>&1 &
  SPID=$!
  for _ in $(seq 300); do
    grep -q '^ready' "$TMP/register-server.log" && return 0
    kill -0 "$SPID" 2> /dev/null || break
    sleep 0.1
  done
  wait "$SPID" 2> /dev/null || true
  SPID=
  return 1
}
if ! serve_shm; then
  if [[ "$INDEX_MEMORY_BYTES" != 0 ]] && grep -q 'unknown field `index_memory_bytes`' "$TMP/register-server.log"; then
    echo "note: this starling does not know storage.index_memory_bytes: the run goes on without it (INDEX_MEMORY_BYTES=0)"
    INDEX_MEMORY_BYTES=0
    bench_server_config "$INFLIGHT" > "$TMP/starling.toml"
    rm -rf "$SHM/data"
    serve_shm || { cat "$TMP/register-server.log"; echo "starling did not start" >&2; exit 1; }
  else
    cat "$TMP/register-server.log"
    echo "starling did not start" >&2
    exit 1
  fi
fi
if [[ "$REGISTER_ON_TMPFS" == 1 ]]; then
  START=$(date +%s.%N)
  "$BENCH" register --target "plain://$S_PLAIN" --data-dir "$SHM/data" --count "$ACCOUNTS" \
    --concurrency 32 --out "$TMP/accounts.json" > "$OUT/register.txt" 2>&1 || { cat "$OUT/register.txt"; exit 1; }
  echo "phase register (tmpfs): $(python3 -c "print(round($(date +%s.%N) - $START, 1))") s for $ACCOUNTS accounts"
fi
kill "$SPID"
wait "$SPID" 2> /dev/null || true
SPID=
if [[ "$REGISTER_ON_TMPFS" == 1 ]]; then cp -a "$SHM/data" "$TMP/data"; fi
rm -rf "$SHM"
SHM=

echo "# $(date -u), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); commit $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?'); $MESSAGES messages, $CONVERSATIONS conversations, $SENDERS senders, index_memory_bytes ${INDEX_MEMORY_BYTES}"
"$BENCH" store-scale --starling "$STARLING" --config "$TMP/starling.toml" --data-dir "$TMP/data" \
  --server-log "$OUT/starling.log" --tls-listen "$S_TLS" --plain-listen "$S_PLAIN" \
  --metrics-listen "$METRICS" --shards "$SHARDS" --accounts "$TMP/accounts.json" \
  --messages "$MESSAGES" --conversations "$CONVERSATIONS" --senders "$SENDERS" --ops "$OPS" \
  --verify "$VERIFY" --fill-secs "$FILL_SECS" --ready-timeout-secs "$READY_TIMEOUT_SECS" \
  --sample-secs "$SAMPLE_SECS" --index-memory-bytes "$INDEX_MEMORY_BYTES" \
  --json "$OUT/store-scale.json" 2>&1 \
  | sed -u -e 's/\r/\n/g; s/\x1b\[2K//g' | grep --line-buffered -v -E '^(fill|register|cold|hot|verify): '
echo "JSON: $OUT/store-scale.json"
