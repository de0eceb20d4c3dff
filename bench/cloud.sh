#!/usr/bin/env bash
# Cloud-mode benchmark against the release binary and a fresh Postgres database, loopback only,
# bounded in time: the core endpoint with API keys (limits raised), offline responder.
# Three keys share the load, to show argon2 runs once per key, not per request.
#   bench/cloud.sh                          # 10 s, 32 connections
#   DURATION=30s CONNECTIONS=64 bench/cloud.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
command -v oha >/dev/null || cargo install oha --locked
command -v jq >/dev/null || { echo "bench: jq is needed" >&2; exit 1; }
cargo build --release --locked --quiet
maestra=target/release/maestra

db="maestra_bench_$$"
psql -q "$ADMIN_URL" -c "CREATE DATABASE $db"
export DATABASE_URL="${ADMIN_URL%/*}/$db"
work=$(mktemp -d)
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  rm -rf "$work"
}
trap cleanup EXIT

keys=()
for i in 1 2 3; do
  keys+=("$($maestra keys create --tenant "bench$i" --rate-limit 100000000/60 2>/dev/null)")
done
token=bench-metrics-token
MAESTRA_MODE=cloud MAESTRA_HOST=127.0.0.1 MAESTRA_PORT=${PORT:-8700} MAESTRA_LOG_LEVEL=warn \
  MAESTRA_METRICS_TOKEN=$token $maestra serve >"$work/server.log" 2>&1 &
server=$!
url="http://127.0.0.1:${PORT:-8700}"
for _ in $(seq 100); do curl -fs "$url/health/ready" >/dev/null && break; sleep 0.1; done

# Conversation ids are global: each key (tenant) gets its own 64 conversations.
for k in 0 1 2; do
  for i in $(seq 64); do
    printf '{"user_id":"bench","surface_id":"mobile","conversation_id":"conv_bench_%d_%d","message":"Hello, how is the project going?"}\n' "$k" "$i"
  done >"$work/bodies$k.jsonl"
done

# The floor: /health, no key, no database work beyond its check.
oha --no-tui --output-format json -z "$DURATION" -c "$CONNECTIONS" "$url/health" >"$work/health.json"

per_key=$(( (CONNECTIONS + 2) / 3 ))
for i in 0 1 2; do
  oha --no-tui --output-format json -z "$DURATION" -c "$per_key" -m POST \
    -H 'Content-Type: application/json' -H "X-API-Key: ${keys[$i]}" \
    -Z "$work/bodies$i.jsonl" "$url/api/maestra/core" >"$work/core$i.json" &
done
wait %2 %3 %4 2>/dev/null || wait

argon2=$(curl -fs -H "Authorization: Bearer $token" "$url/metrics" |
  awk '/^maestra_auth_argon2_verifications_total/ { print $2 }')
rss=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$server/status")

echo "maestra cloud-mode benchmark: $(date -u +%FT%TZ), $(nproc) cores, $DURATION, $CONNECTIONS connections"
jq -rs '
  def row($name): [$name, (.summary.requestsPerSec | floor),
    (.latencyPercentiles.p50 * 1e6 | round / 1e3), (.latencyPercentiles.p99 * 1e6 | round / 1e3),
    ([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0)];
  (["scenario", "req/s", "p50 ms", "p99 ms", "non-200"] | @tsv),
  (.[0] | row("health") | @tsv),
  ((.[1:] | {
      summary: {requestsPerSec: (map(.summary.requestsPerSec) | add)},
      latencyPercentiles: {p50: (map(.latencyPercentiles.p50) | max), p99: (map(.latencyPercentiles.p99) | max)},
      statusCodeDistribution: (map(.statusCodeDistribution | to_entries[]) | group_by(.key)
        | map({key: .[0].key, value: (map(.value) | add)}) | from_entries)
    }) | row("core, 3 keys") | @tsv)' \
  "$work/health.json" "$work/core0.json" "$work/core1.json" "$work/core2.json"
core_rps=$(jq -s 'map(.summary.requestsPerSec) | add | floor' "$work"/core?.json)
echo "argon2 verifications during the run: $argon2 (3 keys); argon2-bound ceiling ~150/s; core ran at ${core_rps}/s"
echo "server peak RSS: ${rss} MB"
jq -sc '[.[] | .statusCodeDistribution] | add' "$work"/core?.json | sed 's/^/core status codes: /'
jq -sc '[.[] | .errorDistribution] | add' "$work"/core?.json | sed 's/^/core client errors: /'
grep -m3 -E '"level":"(WARN|ERROR)"' "$work/server.log" | cut -c1-300 || true
