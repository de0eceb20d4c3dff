#!/usr/bin/env bash
# Cloud-mode benchmark against the release binary and a fresh Postgres database, loopback only,
# bounded in time: the core endpoint with API keys (limits raised), offline responder, next to
# bench/pgbench.sh (the same requests' database work) on the same database in the same run.
# Three keys share the connections, to show argon2 runs once per key, not per request.
# Reports where the CPU went during the core run (maestra, every postgres process, the rest:
# mostly oha and other users of the machine).
#   bench/cloud.sh                          # 10 s, 32 connections
#   DURATION=30s CONNECTIONS=64 bench/cloud.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup
bench_need psql

bench_database maestra_bench
export DATABASE_URL=$db_url
keys=()
for i in 1 2 3; do
  keys+=("$("$MAESTRA" keys create --tenant "bench$i" --rate-limit 100000000/60 2>/dev/null)")
done
token=bench-metrics-token
start_cloud cloud MAESTRA_METRICS_TOKEN=$token
url=$server_url
server=$server_pid

# Conversation ids are global: each key (tenant) gets its own 64 conversations.
for k in 0 1 2; do core_bodies "conv_bench_$k" 64 >"$bench_work/bodies$k.jsonl"; done
# The connections split over the keys: 11 + 11 + 10 for 32.
conns=($(((CONNECTIONS + 2) / 3)) $(((CONNECTIONS + 1) / 3)) $((CONNECTIONS / 3)))

bench_header "maestra cloud-mode benchmark ($DURATION, $CONNECTIONS connections)"
# The database floor first, on this database (its own tenant and conversations).
pgbench_line=$(BENCH_BUILT=1 PGBENCH_DATABASE_URL=$DATABASE_URL CLIENTS=$CONNECTIONS \
  "$BENCH_ROOT/bench/pgbench.sh")
echo "$pgbench_line"
read -r pg_tps pg_p99 < <(sed -E 's/.*: ([0-9]+) TPS, p50 [0-9.]+ ms, p99 ([0-9.]+) ms.*/\1 \2/' <<<"$pgbench_line")
# The lean model of the same contract (issue 17), in a database of its own.
lean_line=$(CLIENTS=$CONNECTIONS "$BENCH_ROOT/bench/lean.sh")
echo "$lean_line"
read -r lean_tps lean_p99 < <(sed -E 's/.*: ([0-9]+) TPS, p50 [0-9.]+ ms, p99 ([0-9.]+) ms.*/\1 \2/' <<<"$lean_line")

printf 'scenario\treq/s\tp50 ms\tp99 ms\terrors\n'
# Cloud /health makes one Postgres round trip per call: not the HTTP floor (see bench/local.sh).
oha_run "cloud /health" -c "$CONNECTIONS" "$url/health"

loads=()
cpu0=$(cpu_seconds "$server"); pg0=$(postgres_cpu_seconds); all0=$(machine_busy_seconds)
lsn0=$(wal_lsn "$DATABASE_URL"); read -r x0 ins0 upd0 hot0 <<<"$(db_counters "$DATABASE_URL")"
for i in 0 1 2; do
  oha --no-tui --output-format json -z "$DURATION" -c "${conns[$i]}" -m POST \
    -H 'Content-Type: application/json' -H "X-API-Key: ${keys[$i]}" \
    -Z "$bench_work/bodies$i.jsonl" "$url/api/maestra/core" >"$bench_work/core$i.json" &
  loads+=($!)
done
for pid in "${loads[@]}"; do wait "$pid"; done
cpu1=$(cpu_seconds "$server"); pg1=$(postgres_cpu_seconds); all1=$(machine_busy_seconds)
# The server's connections report their counters within a second of going idle.
sleep 1.5
lsn1=$(wal_lsn "$DATABASE_URL"); read -r x1 ins1 upd1 hot1 <<<"$(db_counters "$DATABASE_URL")"

# The three runs as one: rates add up, latencies are the worst of the three.
jq -s '{
    summary: {requestsPerSec: (map(.summary.requestsPerSec) | add)},
    latencyPercentiles: {p50: (map(.latencyPercentiles.p50) | max), p99: (map(.latencyPercentiles.p99) | max)},
    statusCodeDistribution: (map(.statusCodeDistribution | to_entries[]) | group_by(.key)
      | map({key: .[0].key, value: (map(.value) | add)}) | from_entries),
    errorDistribution: (map(.errorDistribution | to_entries[]) | group_by(.key)
      | map({key: .[0].key, value: (map(.value) | add)}) | from_entries)
  }' "$bench_work"/core?.json >"$bench_work/core.json"
core=$(oha_row "core, 3 keys" "$bench_work/core.json"); echo "$core"

argon2=$(curl -fs -H "Authorization: Bearer $token" "$url/metrics" |
  awk '/^maestra_auth_argon2_verifications_total/ { print $2 }')
rss=$(peak_rss_mb "$server")
echo "argon2 verifications during the run: $argon2 (3 keys)"
echo "server peak RSS: $rss MB (VmRSS now: $(rss_mb "$server") MB)"
jq -c '.statusCodeDistribution' "$bench_work/core.json" | sed 's/^/core status codes: /'
awk -v m0="$cpu0" -v m1="$cpu1" -v p0="$pg0" -v p1="$pg1" -v a0="$all0" -v a1="$all1" 'BEGIN {
  m = m1 - m0; p = p1 - p0; a = a1 - a0
  printf "CPU during the core run: %.1f s busy of the machine: maestra %.1f s (%.0f%%), postgres %.1f s (%.0f%%), rest (oha, others) %.1f s (%.0f%%)\n",
    a, m, 100 * m / a, p, 100 * p / a, a - m - p, 100 * (a - m - p) / a }'
awk -v c="$(col 2 "$core")" -v cp="$(col 4 "$core")" -v t="$pg_tps" -v tp="$pg_p99" 'BEGIN {
  printf "ratios: core / pgbench TPS %.2f, core p99 / pgbench p99 %.2f\n", c / t, cp / tp }'
awk -v c="$(col 2 "$core")" -v cp="$(col 4 "$core")" -v t="$lean_tps" -v tp="$lean_p99" 'BEGIN {
  printf "ratios: core / lean model TPS %.2f, core p99 / lean model p99 %.2f\n", c / t, cp / tp }'
# Per answered core request (2xx), in this database: WAL, transactions, rows written.
answered=$(jq '[.statusCodeDistribution | to_entries[] | select(.key | test("^2")) | .value] | add // 0' "$bench_work/core.json")
read -r wal _ < <(wal_bytes "$DATABASE_URL" "$lsn0" "$lsn1")
awk -v n="$answered" -v w="$wal" -v x="$((x1 - x0))" -v i="$((ins1 - ins0))" -v u="$((upd1 - upd0))" \
  -v h="$((hot1 - hot0))" 'BEGIN { n = n > 0 ? n : 1
  printf "per core request: %.0f WAL bytes, %.2f commits, %.2f rows inserted, %.2f updated (%.2f HOT)\n",
    w / n, x / n, i / n, u / n, h / n }'
grep -m3 -E '"level":"(WARN|ERROR)"' "$bench_work/cloud.log" | cut -c1-300 || true

bench_result cloud_core_rps "$(col 2 "$core")"
bench_result cloud_core_wal_per_request "$(awk -v w="$wal" -v n="$answered" 'BEGIN { printf "%.0f", w / (n > 0 ? n : 1) }')"
bench_result cloud_core_p50 "$(col 3 "$core")"
bench_result cloud_core_p99 "$(col 4 "$core")"
bench_result cloud_core_errors "$(col 5 "$core")"
bench_result cloud_rss "$rss"
bench_result cloud_cpu_maestra "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.1f", b - a }')"
bench_result cloud_cpu_postgres "$(awk -v a="$pg0" -v b="$pg1" 'BEGIN { printf "%.1f", b - a }')"
bench_result cloud_cpu_machine "$(awk -v a="$all0" -v b="$all1" 'BEGIN { printf "%.1f", b - a }')"
