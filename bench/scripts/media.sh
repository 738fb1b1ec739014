#!/usr/bin/env bash
# bench/scripts/media.sh SERVER CLI BENCH [MEDIA_ARGS...]
#
# `starling-bench media` against a fresh `starling` (2 shards, a temporary data directory, TLS on
# 127.0.0.1:7743, the media endpoint on 127.0.0.1:7744): two users are registered with
# `starling-cli`, then the first uploads a 50 MiB file (by default) and sends it to the second,
# and downloads it again, 3 rounds; the server's RSS is sampled during each transfer. Build the
# binaries in release first:
#   cargo build --release -p starling-gateway -p starling-client -p starling-bench
#   bench/scripts/media.sh target/release/starling target/release/starling-cli \
#     target/release/starling-bench
set -euo pipefail
server=$(realpath "$1"); cli=$(realpath "$2"); bench=$(realpath "$3")
shift 3
dir=$(mktemp -d)
cat > "$dir/starling.toml" <<TOML
[media]
listen = "127.0.0.1:7744"
size_bytes_max = 1073741824
TOML
"$server" serve --config "$dir/starling.toml" --data-dir "$dir/data" \
  --listen 127.0.0.1:7743 --metrics-listen off --shards 2 > "$dir/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 300); do
  grep -q '^ready$' "$dir/server.log" && break
  sleep 0.1
done
grep -q '^ready$' "$dir/server.log" || { cat "$dir/server.log" >&2; exit 1; }
ca="$dir/data/tls/ca.pem"
register() { # PROFILE PHONE NAME -> user id
  "$cli" --json --server 127.0.0.1:7743 --ca "$ca" --profile "$1" request-otp --phone "$2" > /dev/null
  code=$(grep "^$2 " "$dir/data/otp.log" | tail -1 | awk '{print $2}')
  "$cli" --json --server 127.0.0.1:7743 --ca "$ca" --profile "$1" \
    verify --phone "$2" --code "$code" --name "$3" | sed -E 's/.*"user_id":([0-9]+).*/\1/'
}
register "$dir/ana" +15550900001 Ana > /dev/null
ben=$(register "$dir/ben" +15550900002 Ben)
"$bench" media --server 127.0.0.1:7743 --ca "$ca" --profile "$dir/ana" --to "$ben" \
  --server-pid "$pid" "$@"
