#!/usr/bin/env bash
# Local-mode HTTP benchmark against the release binary, loopback only, bounded in time.
# Prints req/s, p50, p99 and errors for /health (the HTTP floor) and for the core endpoint with
# the offline responder, next to the disk's own append+fsync rate measured in the same run.
#   bench/local.sh                 # 10 s per scenario, 32 connections
#   DURATION=30s CONNECTIONS=64 bench/local.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
command -v oha >/dev/null || cargo install oha --locked
command -v jq >/dev/null || { echo "bench: jq is needed" >&2; exit 1; }
cargo build --release --locked --quiet

work=$(mktemp -d -p "${BENCH_DIR:-.}" maestra-bench.XXXXXX)
MAESTRA_PORT=0 MAESTRA_DATA_DIR="$work/data" MAESTRA_LOG_LEVEL=warn target/release/maestra serve &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -s "$work/data/maestra.port" ] && break; sleep 0.1; done
url="http://127.0.0.1:$(cat "$work/data/maestra.port")"

# The floor for local mode: synchronous 512-byte appends on the same disk.
fsync_rate=$(dd if=/dev/zero of="$work/fsync.bin" bs=512 count=2000 oflag=dsync 2>&1 |
  awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^s,?$/) secs = $(i-1); print int(2000 / secs) }')

# 64 conversations, one body per line: requests spread over them as surfaces would.
for i in $(seq 64); do
  printf '{"user_id":"bench","surface_id":"cli","conversation_id":"conv_bench_%d","message":"Hello, how is the project going?"}\n' "$i"
done > "$work/bodies.jsonl"

run() { # name, oha arguments...
  local name=$1; shift
  oha --no-tui --output-format json -z "$DURATION" -c "$CONNECTIONS" "$@" > "$work/$name.json"
  jq -r --arg name "$name" '[$name,
      (.summary.requestsPerSec | floor),
      (.latencyPercentiles.p50 * 1000 * 1000 | round / 1000),
      (.latencyPercentiles.p99 * 1000 * 1000 | round / 1000),
      ([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0)]
    | @tsv' "$work/$name.json"
}

echo "maestra local-mode benchmark: $(date -u +%FT%TZ), $(nproc) cores, $DURATION x $CONNECTIONS connections"
echo "disk append+fsync floor: $fsync_rate writes/s (each core request makes 2)"
printf 'scenario\treq/s\tp50 ms\tp99 ms\tnon-200\n'
health=$(run health "$url/health"); echo "$health"
core=$(run core -m POST -H 'Content-Type: application/json' -Z "$work/bodies.jsonl" "$url/api/maestra/core"); echo "$core"
rss=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$server/status")
echo "server peak RSS: ${rss} MB"
awk -v h="$(cut -f2 <<<"$health")" -v c="$(cut -f2 <<<"$core")" -v f="$fsync_rate" 'BEGIN {
  printf "ratios: core/health %.3f, core/(fsync floor/2) %.2f\n", c / h, c / (f / 2) }'
