#!/usr/bin/env bash
# bench/scripts/login-flood.sh — the "Password-login flood" figure of docs/benchmarks/abuse.md: a fresh Starling
# server (both shards, TLS), 20 accounts registered, then one `starling-bench login-flood` run
# (a baseline phase, then a flood phase, DURATION seconds each).
#
#   bench/scripts/login-flood.sh OUT.json
#   FLOOD_RATE=200 STARLING=/path/to/other/starling bench/scripts/login-flood.sh OUT.json
#
# Knobs: STARLING (./target/release/starling), BENCH (./target/release/starling-bench),
# FLOOD_RATE (100 password logins/s), FLOOD_CONNS (32), DURATION (20), ACCOUNTS_TOML (more
# `[accounts]` settings, with `\n` escapes, e.g. 'password_hash_priority = "low"'). The server
# listens on 127.0.0.1:7443 (check `ss -ltnp | grep 7443` first: SO_REUSEPORT lets a forgotten
# server take half the connections). Bounded: two phases of DURATION seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:?usage: login-flood.sh OUT.json}
STARLING=${STARLING:-$ROOT/target/release/starling}
BENCH=${BENCH:-$ROOT/target/release/starling-bench}
FLOOD_RATE=${FLOOD_RATE:-100}
FLOOD_CONNS=${FLOOD_CONNS:-32}
DURATION=${DURATION:-20}

dir=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

# OTP limits raised so `register` can create every account at once; tokens outlive the run.
printf '[accounts]\naccess_token_ttl_ms = 86400000\notp_requests_per_ip_per_hour = 100000\notp_requests_per_identifier_per_hour = 100\n%b\n' \
  "${ACCOUNTS_TOML:-}" > "$dir/starling.toml"
"$STARLING" serve --config "$dir/starling.toml" --data-dir "$dir/data" \
  --listen 127.0.0.1:7443 --metrics-listen 127.0.0.1:9464 > "$dir/server.log" 2>&1 &
server=$!
for _ in $(seq 150); do
  grep -q '^ready' "$dir/server.log" && break
  kill -0 "$server" 2>/dev/null || { cat "$dir/server.log"; exit 1; }
  sleep 0.2
done
grep -q '^ready' "$dir/server.log" || { echo "server not ready" >&2; exit 1; }

"$BENCH" register --target tls://127.0.0.1:7443 --data-dir "$dir/data" --count 20 \
  --out "$dir/accounts.json" > /dev/null
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$BENCH" login-flood --target tls://127.0.0.1:7443 --data-dir "$dir/data" --accounts "$dir/accounts.json" \
  --pairs 10 --msg-rate 200 --hello-rate 5 --flood-conns "$FLOOD_CONNS" --flood-rate "$FLOOD_RATE" \
  --sources 16 --duration-secs "$DURATION" --server-pid "$server" --json "$OUT"
