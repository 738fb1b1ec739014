# bench/scripts/bench-config.sh — sourced by bench/compare.sh and bench/scripts/latency-runs.sh.
#
# bench_server_config INFLIGHT [EXTRA]: prints the Starling config both benchmarks run with:
# OTP limits raised so `starling-bench register` can create every account at once, access tokens
# that outlive any run, the in-flight window INFLIGHT (the load generator is given the same), and
# EXTRA (TOML with `\n` escapes, e.g. "[storage]\ncommit_interval_min_us = 100") appended.
bench_server_config() {
  cat <<EOF_CONFIG
[accounts]
otp_requests_per_ip_per_hour = 1000000
otp_requests_per_identifier_per_hour = 1000
otp_resend_ms = 0
access_token_ttl_ms = 86400000

[limits]
inflight_requests_max = $1
$(printf '%b' "${2:-}")
EOF_CONFIG
}
