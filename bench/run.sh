#!/usr/bin/env bash
# shellcheck disable=SC2154 # the figures are variables set by sourcing $BENCH_RESULTS
# The whole benchmark suite in one invocation, bounded in time (about 8-9 minutes with
# DURATION=10s), loopback only, against the release binary: bench/local.sh, bench/provider.sh,
# bench/cloud.sh (with bench/pgbench.sh on its database and bench/lean.sh beside it), bench/growth.sh and bench/sync.sh, then
# a summary of the targets, each measured as a ratio to a baseline taken in this same run.
#   bench/run.sh                     # DURATION=10s CONNECTIONS=32 RATE=500
#   SKIP_GROWTH=1 bench/run.sh       # without the growth and memory benchmarks
#   SKIP_SYNC=1 bench/run.sh         # without the sync benchmarks (about 4 minutes)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup
export BENCH_BUILT=1 DURATION CONNECTIONS
BENCH_RESULTS="$bench_work/results.env"
export BENCH_RESULTS
: >"$BENCH_RESULTS"

started=$(date +%s)
machine="$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GB", $2 / 1048576 }' /proc/meminfo), $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
echo "maestra benchmark suite: $(date -u +%FT%TZ); $machine; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "DURATION=$DURATION CONNECTIONS=$CONNECTIONS RATE=${RATE:-500}; $(git -C "$BENCH_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
for script in local provider cloud growth sync; do
  if [ "$script" = growth ] && [ -n "${SKIP_GROWTH:-}" ]; then continue; fi
  if [ "$script" = sync ] && [ -n "${SKIP_SYNC:-}" ]; then continue; fi
  echo
  echo "===== bench/$script.sh"
  "$BENCH_ROOT/bench/$script.sh"
done

# shellcheck disable=SC1090
source "$BENCH_RESULTS"
echo
echo "===== summary ($(($(date +%s) - started)) s; every ratio against a baseline measured in this run)"
row() { # target, measured, ratio, verdict
  printf '%-58s | %-58s | %-22s | %s\n' "$@"
}
verdict() { # awk condition on the variables given as name=value...
  local cond=$1
  shift
  awk "$@" "BEGIN { exit !($cond) }" && echo PASS || echo MISS
}
row "target" "measured" "ratio" "verdict"
row "1. cloud core, 32 conns >= 0.8x pgbench TPS" \
  "$cloud_core_rps req/s vs pgbench $pgbench_tps TPS" \
  "$(awk -v a="$cloud_core_rps" -v b="$pgbench_tps" 'BEGIN { printf "%.2fx", a / b }')" \
  "$(verdict 'a / b >= 0.8' -v a="$cloud_core_rps" -v b="$pgbench_tps")"
row "1. cloud core p99 <= 2x pgbench p99" \
  "p99 $cloud_core_p99 ms vs pgbench $pgbench_p99 ms" \
  "$(awk -v a="$cloud_core_p99" -v b="$pgbench_p99" 'BEGIN { printf "%.2fx", a / b }')" \
  "$(verdict 'a / b <= 2' -v a="$cloud_core_p99" -v b="$pgbench_p99")"
row "1. cloud core: 0 errors" "$cloud_core_errors errors" "-" \
  "$(verdict 'e == 0' -v e="$cloud_core_errors")"
row "4. cloud core, 32 conns >= 0.8x lean model TPS" \
  "$cloud_core_rps req/s vs lean model $lean_tps TPS" \
  "$(awk -v a="$cloud_core_rps" -v b="$lean_tps" 'BEGIN { printf "%.2fx", a / b }')" \
  "$(verdict 'a / b >= 0.8' -v a="$cloud_core_rps" -v b="$lean_tps")"
row "4. cloud core p99 <= 2x lean model p99" \
  "p99 $cloud_core_p99 ms vs lean model $lean_p99 ms" \
  "$(awk -v a="$cloud_core_p99" -v b="$lean_p99" 'BEGIN { printf "%.2fx", a / b }')" \
  "$(verdict 'a / b <= 2' -v a="$cloud_core_p99" -v b="$lean_p99")"
row "2. overhead over a fake provider at ${RATE:-500} req/s: p99 < 3 ms" \
  "p99 $provider_maestra_p99 ms through vs $provider_direct_p99 ms direct (disk alone $provider_disk_p99)" \
  "+$provider_overhead_p99 ms ($(awk -v a="$provider_overhead_p99" 'BEGIN { printf "%.2fx", a / 3 }') of 3)" \
  "$(verdict 'o < 3 && e == 0' -v o="$provider_overhead_p99" -v e="$provider_errors")"
row "3. local /health >= 0.5x actix hello world" \
  "$health_rps vs $hello_rps req/s" \
  "$(awk -v a="$health_rps" -v b="$hello_rps" 'BEGIN { printf "%.2fx", a / b }')" \
  "$(verdict 'a / b >= 0.5 && e == 0' -v a="$health_rps" -v b="$hello_rps" -v e="$health_errors")"
row "4. local core >= 0.5x append+fsync rate" \
  "$local_core_rps req/s vs $fsync_rate fsyncs/s" \
  "$(awk -v a="$local_core_rps" -v b="$fsync_rate" 'BEGIN { printf "%.2fx", a / b }')" \
  "$(verdict 'a / b >= 0.5 && e == 0' -v a="$local_core_rps" -v b="$fsync_rate" -v e="$local_core_errors")"
row "5. peak RSS under local core load < 64 MB" \
  "$local_core_rss MB (cloud server: $cloud_rss MB)" \
  "$(awk -v a="$local_core_rss" 'BEGIN { printf "%.2fx", a / 64 }') of 64 MB" \
  "$(verdict 'a < 64' -v a="$local_core_rss")"
if [ -z "${SKIP_GROWTH:-}" ]; then
  for store in local cloud; do
    p50="growth_${store}_ratio_p50" p99="growth_${store}_ratio_p99"
    row "growth ($store): 100,000 vs 10 msgs, p50 within 1.5x" \
      "p50 ${!p50}x, p99 ${!p99}x" "${!p50}x (p50)" \
      "$(verdict 'a <= 1.5' -v a="${!p50}")"
  done
  row "memory flat: RSS at 20,000 conversations vs 1,000 (<= 1.25x)" \
    "100: $memory_rss_100, 1,000: $memory_rss_1000, 20,000: $memory_rss_20000 MB" \
    "$(awk -v a="$memory_rss_20000" -v b="$memory_rss_1000" 'BEGIN { printf "%.2fx", a / b }')" \
    "$(verdict 'a / b <= 1.25' -v a="$memory_rss_20000" -v b="$memory_rss_1000")"
fi
if [ -z "${SKIP_SYNC:-}" ]; then
  row "sync: converge, 1,000 pending, after reconnecting (<= 5 s)" \
    "$(awk -v a="$sync_converge_ms" 'BEGIN { printf "%.2f s", a / 1000 }') vs psql inserting them $sync_converge_floor_ms ms" \
    "$(awk -v a="$sync_converge_ms" -v b="$sync_converge_floor_ms" 'BEGIN { printf "%.2fx", a / b }')" \
    "$(verdict 'a <= 5000' -v a="$sync_converge_ms")"
  row "sync: a new install pulls 10,000 messages (<= 10 s)" \
    "$(awk -v a="$sync_pull_ms" 'BEGIN { printf "%.2f s", a / 1000 }') vs psql reading them $sync_pull_floor_ms ms" \
    "$(awk -v a="$sync_pull_ms" -v b="$sync_pull_floor_ms" 'BEGIN { printf "%.2fx", a / b }')" \
    "$(verdict 'a <= 10000' -v a="$sync_pull_ms")"
  row "sync: a round with nothing to do (1 request, <= 1 KiB)" \
    "$sync_idle_requests request, $sync_idle_bytes B vs GET /health/live $sync_idle_floor_bytes B" \
    "$(awk -v a="$sync_idle_bytes" -v b="$sync_idle_floor_bytes" 'BEGIN { printf "%.2fx", a / b }')" \
    "$(verdict 'n == 1 && b <= 1024' -v n="$sync_idle_requests" -v b="$sync_idle_bytes")"
  row "sync: a local turn with sync on vs off (<= 1.05x)" \
    "p50 ${sync_turn_p50}x, p99 ${sync_turn_p99}x, CPU ${sync_turn_cpu}x; saturation ${sync_turn_rps}x" \
    "${sync_turn_p99}x (p99)" \
    "$(verdict 'a <= 1.05 && b <= 1.05' -v a="$sync_turn_p50" -v b="$sync_turn_p99")"
fi
echo "streaming (local, offline responder): $stream_rps req/s, p99 $stream_p99 ms, $stream_errors errors"
