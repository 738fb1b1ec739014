#!/usr/bin/env bash
# bench/scripts/block-flood.sh SERVER BENCH JSON [EXTRA_TOML] [BLOCK_FLOOD_ARGS...]
#
# One `starling-bench block-flood` run against a fresh `starling` (2 shards, a temporary data
# directory, TLS on 127.0.0.1:7643): accounts are registered first, the server's CPU is measured
# per phase, the report goes to JSON. EXTRA_TOML (with `\n` escapes) is appended to the server's
# config, e.g. "[router]\nblock_requests_per_s = 1000000\nblock_requests_burst = 1000000" to let
# every Block/Unblock through to the metadata writer. docs/benchmarks/abuse.md has the figures.
set -euo pipefail
server=$(realpath "$1"); bench=$(realpath "$2"); json=$3; extra=${4:-}
shift $(( $# < 4 ? $# : 4 ))
here=$(dirname "$0")
# shellcheck source=bench/scripts/bench-config.sh
. "$here/bench-config.sh"
dir=$(mktemp -d)
bench_server_config 64 "$extra" > "$dir/starling.toml"
"$server" serve --config "$dir/starling.toml" --data-dir "$dir/data" \
  --listen 127.0.0.1:7643 --metrics-listen 127.0.0.1:9664 --shards 2 > "$dir/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 300); do
  grep -q '^ready$' "$dir/server.log" && break
  sleep 0.1
done
grep -q '^ready$' "$dir/server.log" || { cat "$dir/server.log" >&2; exit 1; }
pairs=20
for a in "$@"; do [[ $a == --pairs=* ]] && pairs=${a#--pairs=}; done
"$bench" register --target tls://127.0.0.1:7643 --data-dir "$dir/data" \
  --count $(( 2 * pairs + 2 )) --out "$dir/accounts.json" > /dev/null
"$bench" block-flood --target tls://127.0.0.1:7643 --data-dir "$dir/data" \
  --accounts "$dir/accounts.json" --server-pid "$pid" --json "$json" "$@"
