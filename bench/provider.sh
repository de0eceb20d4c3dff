#!/usr/bin/env bash
# The backend's overhead over the model provider's own latency, local mode, release build.
# A fast fake OpenAI-compatible provider (examples/fake_provider.rs) answers at once. In the same
# run the load goes to it directly and through maestra (core endpoint, 64 conversations whose
# history grows to the full window), at a fixed rate and at saturation; the overhead is the
# difference at each percentile. For reference, the same load goes to a second maestra with
# the offline responder (no provider call at all: HTTP, two durable appends, the ledger).
# Then a sequential sample of X-Maestra-Overhead-Ms, the overhead maestra reports per request.
#   bench/provider.sh                          # 10 s per scenario, 500 req/s, 32 connections
#   DURATION=30s RATE=500 CONNECTIONS=32 ROUNDS=3 bench/provider.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup

RATE=${RATE:-500}
ROUNDS=${ROUNDS:-3}
SAMPLES=${SAMPLES:-500}

start_fake_provider

# MODE=cloud: the same in cloud mode (Postgres, an API key with its limit raised).
MODE=${MODE:-local}
llm=(MAESTRA_LLM_BASE_URL="$provider/v1" MAESTRA_LLM_MODEL=bench-model
  MAESTRA_LLM_PRICE_INPUT=0.15 MAESTRA_LLM_PRICE_OUTPUT=0.60)
auth=()
if [ "$MODE" = cloud ]; then
  bench_database bench_provider
  provider_db=$db_url
  key=$(DATABASE_URL=$provider_db "$MAESTRA" keys create --tenant bench --rate-limit 100000000/60 2>/dev/null)
  auth=(-H "X-API-Key: $key")
  start_cloud data DATABASE_URL="$provider_db" "${llm[@]}"
  url=$server_url
  server=$server_pid
  # Its own database; the same key, ensured there as MAESTRA_API_KEY with the limit raised.
  bench_database bench_offline
  start_cloud offline DATABASE_URL="$db_url" MAESTRA_API_KEY="$key" \
    MAESTRA_RATE_LIMIT_REQUESTS=100000000
  offline_url=$server_url
else
  start_local data "${llm[@]}"
  url=$server_url
  server=$server_pid
  start_local offline
  offline_url=$server_url
fi

core_bodies conv_bench 64 >"$bench_work/bodies.jsonl"
# What maestra sends the provider for a short conversation: the persona and a message.
direct_body='{"model":"bench-model","messages":[{"role":"system","content":"You are Maestra."},{"role":"user","content":"Hello, how is the project going?"}],"stream":false}'

direct() { oha_run "$1" "${@:2}" -m POST -H 'Content-Type: application/json' -d "$direct_body" "$provider/v1/chat/completions"; }
through() { oha_run "$1" "${@:2}" "${auth[@]}" -m POST -H 'Content-Type: application/json' -Z "$bench_work/bodies.jsonl" "$url/api/maestra/core"; }
offline() { oha_run "$1" "${@:2}" "${auth[@]}" -m POST -H 'Content-Type: application/json' -Z "$bench_work/bodies.jsonl" "$offline_url/api/maestra/core"; }
overhead() { # label, direct row, maestra row
  awk -F'\t' -v label="$1" -v d="$2" -v m="$3" 'BEGIN {
    split(d, a, "\t"); split(m, b, "\t")
    printf "%s overhead: p50 +%.3f ms, p99 +%.3f ms (maestra %.2fx / %.2fx the direct latency)\n",
      label, b[3] - a[3], b[4] - a[4], b[3] / a[3], b[4] / a[4] }'
}

bench_header "maestra provider-overhead benchmark, $MODE mode ($DURATION per scenario)"
echo "(fake provider, maestra and oha share the machine)"
read -r _ fsync_p50 _ < <(fsync_floor 2)
echo "disk: one 512-byte append+fdatasync takes $fsync_p50 ms alone (p50; each core request makes 2)"
printf 'scenario\treq/s\tp50 ms\tp99 ms\terrors\n'
# Warm-up: connection pools, conversation files, history windows.
for target in "$url" "$offline_url"; do
  oha --no-tui -z 2s -c 8 "${auth[@]}" -m POST -H 'Content-Type: application/json' \
    -Z "$bench_work/bodies.jsonl" "$target/api/maestra/core" >/dev/null
done
# At the fixed rate, ROUNDS alternating pairs (direct, then through maestra): a p99 from one
# 10 s run moves by a millisecond or more with the machine's weather. Every round is printed;
# the round with the median overhead is the one reported.
rounds=()
for round in $(seq "$ROUNDS"); do
  d=$(direct "direct@${RATE}/s #$round" -q "$RATE" -c 16 --latency-correction); echo "$d"
  m=$(through "maestra@${RATE}/s #$round" -q "$RATE" -c 16 --latency-correction); echo "$m"
  rounds+=("$(awk -v d="$(col 4 "$d")" -v m="$(col 4 "$m")" 'BEGIN { printf "%.3f", m - d }')|$d|$m")
done
median=$(printf '%s\n' "${rounds[@]}" | sort -t'|' -k1,1g | sed -n "$(((ROUNDS + 1) / 2))p")
fixed_direct=$(cut -d'|' -f2 <<<"$median")
fixed_maestra=$(cut -d'|' -f3 <<<"$median")
echo "p99 overhead by round: $(printf '%s\n' "${rounds[@]}" | cut -d'|' -f1 | paste -sd' ') ms; median: round $(cut -f1 <<<"$fixed_maestra" | sed 's/.*#//')"
offline "offline@${RATE}/s" -q "$RATE" -c 16 --latency-correction
if [ "$MODE" = local ]; then
  # The disk alone doing the same durable work at the same rate: the floor under the overhead.
  read -r disk_p50 disk_p99 < <(durable_floor "$RATE" "${DURATION%s}")
  printf 'disk alone@%s/s (2 appends+fdatasync each)\t%s\t%s\t%s\t0\n' "$RATE" "$RATE" "$disk_p50" "$disk_p99"
fi
sat_direct=$(direct "direct@${CONNECTIONS}c" -c "$CONNECTIONS"); echo "$sat_direct"
sat_maestra=$(through "maestra@${CONNECTIONS}c" -c "$CONNECTIONS"); echo "$sat_maestra"
offline "offline@${CONNECTIONS}c" -c "$CONNECTIONS"
overhead "fixed ${RATE} req/s" "$fixed_direct" "$fixed_maestra"
if [ "$MODE" = local ]; then
  awk -v m="$(col 4 "$fixed_maestra")" -v d="$(col 4 "$fixed_direct")" -v f="$disk_p99" 'BEGIN {
    printf "of the p99 overhead, the disk alone (two flushes at this rate) takes %.3f ms: %.0f%%\n",
      f, 100 * f / (m - d) }'
fi
overhead "saturation (${CONNECTIONS} connections)" "$sat_direct" "$sat_maestra"
awk -v d="$(col 2 "$sat_direct")" -v m="$(col 2 "$sat_maestra")" \
  'BEGIN { printf "saturation throughput: maestra %.2fx the direct rate\n", m / d }'

# What maestra itself reports per request, one request at a time.
for i in $(seq "$SAMPLES"); do
  curl -s -o /dev/null -D - "${auth[@]}" -H 'Content-Type: application/json' \
    -d "$(sed -n "$(((i % 64) + 1))p" "$bench_work/bodies.jsonl")" "$url/api/maestra/core" |
    tr -d '\r' | awk -F': ' 'tolower($1) == "x-maestra-overhead-ms" { print $2 }'
done | sort -n >"$bench_work/header.txt"
awk '{ v[NR] = $1 } END {
  printf "X-Maestra-Overhead-Ms, %d sequential requests: p50 %.3f ms, p99 %.3f ms\n",
    NR, v[int(NR * 0.50 + 0.5)], v[int(NR * 0.99 + 0.5)] }' "$bench_work/header.txt"
rss=$(peak_rss_mb "$server")
echo "server peak RSS: $rss MB"
if [ "$MODE" = local ]; then
  echo "ledger: $(wc -l <"$bench_work/data/maestra_metrics.jsonl") lines, cost sum $(jq '.cost_usd' "$bench_work/data/maestra_metrics.jsonl" | awk '{ sum += $1 } END { print sum }') USD"
fi

bench_result provider_direct_p50 "$(col 3 "$fixed_direct")"
bench_result provider_direct_p99 "$(col 4 "$fixed_direct")"
bench_result provider_maestra_p50 "$(col 3 "$fixed_maestra")"
bench_result provider_maestra_p99 "$(col 4 "$fixed_maestra")"
bench_result provider_errors "$(($(col 5 "$fixed_maestra") + $(col 5 "$sat_maestra")))"
bench_result provider_overhead_p99 "$(awk -v d="$(col 4 "$fixed_direct")" -v m="$(col 4 "$fixed_maestra")" 'BEGIN { printf "%.3f", m - d }')"
bench_result provider_rss "$rss"
if [ "$MODE" = local ]; then bench_result provider_disk_p99 "$disk_p99"; fi
