#!/usr/bin/env bash
# bench/scripts/keys.sh SERVER BENCH JSON [KEYS_ARGS...]
#
# One `starling-bench keys` run against a fresh `starling` (2 shards, a temporary data directory,
# TLS on 127.0.0.1:7743 for registration, plaintext on 127.0.0.1:7744 for the run): as many
# accounts as connections are registered, each uploads its keys, then every connection keeps
# FetchKeyBundles in flight. The server allows 5,000 one-time prekeys per device so that the
# stock lasts the run. Example:
#   bench/scripts/keys.sh target/release/starling target/release/starling-bench keys.json \
#     --conns 64 --window 16 --prekeys 3000 --secs 10
set -euo pipefail
server=$(realpath "$1"); bench=$(realpath "$2"); json=$3
shift $(( $# < 3 ? $# : 3 ))
here=$(dirname "$0")
# shellcheck source=bench/scripts/bench-config.sh
. "$here/bench-config.sh"
dir=$(mktemp -d)
bench_server_config 64 "[keys]\none_time_prekeys_max = 5000" > "$dir/starling.toml"
"$server" serve --config "$dir/starling.toml" --data-dir "$dir/data" \
  --listen 127.0.0.1:7743 --dangerous-plaintext-listen 127.0.0.1:7744 \
  --metrics-listen 127.0.0.1:9764 --shards 2 > "$dir/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 300); do
  grep -q '^ready$' "$dir/server.log" && break
  sleep 0.1
done
grep -q '^ready$' "$dir/server.log" || { cat "$dir/server.log" >&2; exit 1; }
conns=64
prev=
for a in "$@"; do
  [[ $a == --conns=* ]] && conns=${a#--conns=}
  [[ $prev == --conns ]] && conns=$a
  prev=$a
done
"$bench" register --target tls://127.0.0.1:7743 --data-dir "$dir/data" \
  --count "$conns" --out "$dir/accounts.json" > /dev/null
"$bench" keys --target plain://127.0.0.1:7744 --accounts "$dir/accounts.json" \
  --server-pid "$pid" --json "$json" "$@"
