#!/usr/bin/env bash
# The backend's overhead over the model provider's own latency, local mode, release build.
# A fast fake OpenAI-compatible provider (examples/fake_provider.rs) answers at once. In the same
# run the load goes to it directly and through maestra (core endpoint, 64 conversations whose
# history grows to the full window), at a fixed rate and at saturation; the overhead is the
# difference at each percentile. For reference, the same load goes to a second maestra with
# the offline responder (no provider call at all: HTTP, two durable appends, the ledger).
# Then a sequential sample of X-Maestra-Overhead-Ms, the overhead maestra reports per request.
#   bench/provider.sh                          # 10 s per scenario, 500 req/s, 32 connections
#   DURATION=30s RATE=500 CONNECTIONS=32 bench/provider.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
RATE=${RATE:-500}
CONNECTIONS=${CONNECTIONS:-32}
SAMPLES=${SAMPLES:-500}
command -v oha >/dev/null || cargo install oha --locked
command -v jq >/dev/null || { echo "bench: jq is needed" >&2; exit 1; }
command -v curl >/dev/null || { echo "bench: curl is needed" >&2; exit 1; }
cargo build --release --locked --quiet --bin maestra --example fake_provider

work=$(mktemp -d -p "${BENCH_DIR:-.}" maestra-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

target/release/examples/fake_provider 0 1 > "$work/fake.port" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/fake.port" ] && break; sleep 0.1; done
provider="http://127.0.0.1:$(head -1 "$work/fake.port")"

MAESTRA_PORT=0 MAESTRA_DATA_DIR="$work/data" MAESTRA_LOG_LEVEL=warn \
  MAESTRA_LLM_BASE_URL="$provider/v1" MAESTRA_LLM_MODEL=bench-model \
  MAESTRA_LLM_PRICE_INPUT=0.15 MAESTRA_LLM_PRICE_OUTPUT=0.60 \
  target/release/maestra serve &
server=$!
pids+=("$server")
for _ in $(seq 100); do [ -s "$work/data/maestra.port" ] && break; sleep 0.1; done
url="http://127.0.0.1:$(cat "$work/data/maestra.port")"

MAESTRA_PORT=0 MAESTRA_DATA_DIR="$work/offline" MAESTRA_LOG_LEVEL=warn target/release/maestra serve &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/offline/maestra.port" ] && break; sleep 0.1; done
offline_url="http://127.0.0.1:$(cat "$work/offline/maestra.port")"

# 64 conversations, one body per line: requests spread over them as surfaces would.
for i in $(seq 64); do
  printf '{"user_id":"bench","surface_id":"cli","conversation_id":"conv_bench_%d","message":"Hello, how is the project going?"}\n' "$i"
done > "$work/bodies.jsonl"
# What maestra sends the provider for a short conversation: the persona and a message.
direct_body='{"model":"bench-model","messages":[{"role":"system","content":"You are Maestra."},{"role":"user","content":"Hello, how is the project going?"}],"stream":false}'

run() { # name, oha arguments...
  local name=$1 file="$work/${1//\//_}.json"; shift
  oha --no-tui --output-format json -z "$DURATION" "$@" > "$file"
  jq -r --arg name "$name" '[$name,
      (.summary.requestsPerSec | floor),
      (.latencyPercentiles.p50 * 1000 * 1000 | round / 1000),
      (.latencyPercentiles.p99 * 1000 * 1000 | round / 1000),
      ([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0)]
    | @tsv' "$file"
}
direct() { run "$1" "${@:2}" -m POST -H 'Content-Type: application/json' -d "$direct_body" "$provider/v1/chat/completions"; }
maestra() { run "$1" "${@:2}" -m POST -H 'Content-Type: application/json' -Z "$work/bodies.jsonl" "$url/api/maestra/core"; }
offline() { run "$1" "${@:2}" -m POST -H 'Content-Type: application/json' -Z "$work/bodies.jsonl" "$offline_url/api/maestra/core"; }
overhead() { # label, direct row, maestra row
  awk -F'\t' -v label="$1" -v d="$2" -v m="$3" 'BEGIN {
    split(d, a, "\t"); split(m, b, "\t")
    printf "%s overhead: p50 +%.3f ms, p99 +%.3f ms (maestra %.2fx / %.2fx the direct latency)\n",
      label, b[3] - a[3], b[4] - a[4], b[3] / a[3], b[4] / a[4] }'
}

# The disk's own floor in this run: each core request makes 2 synchronous appends.
fsync_ms=$(dd if=/dev/zero of="$work/fsync.bin" bs=512 count=500 oflag=dsync 2>&1 |
  awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^s,?$/) secs = $(i-1); printf "%.3f", secs * 1000 / 500 }')

echo "maestra provider-overhead benchmark: $(date -u +%FT%TZ), $(nproc) cores, $DURATION per scenario"
echo "(fake provider, maestra and oha share the machine; load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo "disk: one 512-byte append+fsync takes ${fsync_ms} ms alone (each core request makes 2)"
printf 'scenario\treq/s\tp50 ms\tp99 ms\tnon-200\n'
# Warm-up: connection pools, conversation files, history windows.
for target in "$url" "$offline_url"; do
  oha --no-tui -z 2s -c 8 -m POST -H 'Content-Type: application/json' -Z "$work/bodies.jsonl" "$target/api/maestra/core" >/dev/null
done
fixed_direct=$(direct "direct@${RATE}/s" -q "$RATE" -c 16 --latency-correction); echo "$fixed_direct"
fixed_maestra=$(maestra "maestra@${RATE}/s" -q "$RATE" -c 16 --latency-correction); echo "$fixed_maestra"
offline "offline@${RATE}/s" -q "$RATE" -c 16 --latency-correction
sat_direct=$(direct "direct@${CONNECTIONS}c" -c "$CONNECTIONS"); echo "$sat_direct"
sat_maestra=$(maestra "maestra@${CONNECTIONS}c" -c "$CONNECTIONS"); echo "$sat_maestra"
offline "offline@${CONNECTIONS}c" -c "$CONNECTIONS"
overhead "fixed ${RATE} req/s" "$fixed_direct" "$fixed_maestra"
overhead "saturation (${CONNECTIONS} connections)" "$sat_direct" "$sat_maestra"
awk -v d="$(cut -f2 <<<"$sat_direct")" -v m="$(cut -f2 <<<"$sat_maestra")" \
  'BEGIN { printf "saturation throughput: maestra %.2fx the direct rate\n", m / d }'

# What maestra itself reports per request, one request at a time.
for i in $(seq "$SAMPLES"); do
  curl -s -o /dev/null -D - -H 'Content-Type: application/json' \
    -d "$(sed -n "$(( (i % 64) + 1 ))p" "$work/bodies.jsonl")" "$url/api/maestra/core" |
    tr -d '\r' | awk -F': ' 'tolower($1) == "x-maestra-overhead-ms" { print $2 }'
done | sort -n > "$work/header.txt"
awk '{ v[NR] = $1 } END {
  printf "X-Maestra-Overhead-Ms, %d sequential requests: p50 %.3f ms, p99 %.3f ms\n",
    NR, v[int(NR * 0.50 + 0.5)], v[int(NR * 0.99 + 0.5)] }' "$work/header.txt"
rss=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$server/status")
echo "server peak RSS: ${rss} MB"
echo "ledger: $(wc -l < "$work/data/maestra_metrics.jsonl") lines, cost sum $(jq '.cost_usd' "$work/data/maestra_metrics.jsonl" | awk '{sum+=$1} END {print sum}') USD"
