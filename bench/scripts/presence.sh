#!/usr/bin/env bash
# bench/scripts/presence.sh SERVER BENCH JSON [EXTRA_TOML] [PRESENCE_ARGS...]
#
# One `starling-bench presence` run against a fresh `starling` (2 shards, a temporary data
# directory, TLS on 127.0.0.1:7643): users + watchers accounts are registered first (the
# defaults: 1,000 + 10,000), the server's CPU is measured while changes run, the report goes to
# JSON. EXTRA_TOML (with `\n` escapes) is appended to the server's config, e.g.
# "[router]\npresence_coalesce_ms = 50". BENCHMARKS.md has the figures.
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
users=1000; watchers=10000
for a in "$@"; do
  [[ $a == --users=* ]] && users=${a#--users=}
  [[ $a == --watchers=* ]] && watchers=${a#--watchers=}
done
"$bench" register --target tls://127.0.0.1:7643 --data-dir "$dir/data" \
  --count $(( users + watchers )) --out "$dir/accounts.json" > /dev/null
"$bench" presence --target tls://127.0.0.1:7643 --data-dir "$dir/data" \
  --accounts "$dir/accounts.json" --server-pid "$pid" --json "$json" "$@"
