#!/usr/bin/env bash
# Cloud mode on several replicas (issue 14), loopback only, in one run:
# 1. the rate limiter's cost: the core route's latency with MAESTRA_RATE_LIMIT_BACKEND=redis
#    vs memory, two servers on the same database, at a fixed RATE, ROUNDS alternating pairs
#    (the median round reported);
# 2. throughput of 3 replicas vs 1 through HAProxy (Redis limiter), at saturation, with where
#    the CPU went (maestra, postgres, redis, haproxy, the rest: oha and other users).
#   bench/replicas.sh                        # 10 s per scenario, 32 connections, 200 req/s
#   DURATION=20s RATE=300 ROUNDS=5 bench/replicas.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup
bench_need psql redis-server haproxy
RATE=${RATE:-200}
ROUNDS=${ROUNDS:-3}

bench_database maestra_replicas
export DATABASE_URL=$db_url
key=$("$MAESTRA" keys create --tenant bench --rate-limit 100000000/60 2>/dev/null)

redis_port=$(bench_free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$bench_work" >"$bench_work/redis.log" 2>&1 &
redis_pid=$!
bench_pids+=("$redis_pid")
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis=(MAESTRA_RATE_LIMIT_BACKEND=redis "MAESTRA_REDIS_URL=redis://127.0.0.1:$redis_port" MAESTRA_REPLICAS=3)

core_bodies conv_replicas 64 >"$bench_work/bodies.jsonl"
core() { # name, url, [oha arguments]
  local name=$1 url=$2
  shift 2
  oha_run "$name" -m POST -H 'Content-Type: application/json' -H "X-API-Key: $key" \
    -Z "$bench_work/bodies.jsonl" "$@" "$url/api/maestra/core"
}

bench_header "maestra several-replica benchmark ($DURATION per scenario)"

# 1. One server per backend, the same database; alternating rounds at a fixed rate.
start_cloud memory
memory_pid=$server_pid memory_url=$server_url
start_cloud redis "${redis[@]}" MAESTRA_METRICS_TOKEN=bench-metrics-token
redis_server_pid=$server_pid redis_url=$server_url
printf 'scenario\treq/s\tp50 ms\tp99 ms\terrors\n'
mem_p99=() red_p99=()
for round in $(seq "$ROUNDS"); do
  row=$(core "memory, round $round" "$memory_url" -c 16 -q "$RATE" --latency-correction)
  echo "$row"; mem_p99+=("$(col 4 "$row")")
  row=$(core "redis, round $round" "$redis_url" -c 16 -q "$RATE" --latency-correction)
  echo "$row"; red_p99+=("$(col 4 "$row")")
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
mp=$(median "${mem_p99[@]}"); rp=$(median "${red_p99[@]}")
awk -v m="$mp" -v r="$rp" -v q="$RATE" 'BEGIN {
  printf "limiter cost at %s req/s (median of rounds): p99 memory %.2f ms, redis %.2f ms: %.2fx, %+.2f ms\n",
    q, m, r, r / m, r - m }'
# The Redis call itself, as the server measured it (EVALSHA round trip, deadline included).
curl -fs -H "Authorization: Bearer bench-metrics-token" "$redis_url/metrics" | awk '
  /^maestra_ratelimit_backend_duration_seconds_sum/ { sum = $2 }
  /^maestra_ratelimit_backend_duration_seconds_count/ { n = $2 }
  /^maestra_ratelimit_backend_duration_seconds_bucket\{le="0.0008"\}/ { fast = $2 }
  /^maestra_ratelimit_fallbacks_total/ { fb += $2 }
  END { printf "Redis limiter calls: %d, mean %.3f ms, %.1f%% under 0.8 ms, %d decided locally\n",
    n, 1000 * sum / n, 100 * fast / n, fb }'
bench_result replicas_p99_memory "$mp"
bench_result replicas_p99_redis "$rp"
stop_server "$memory_pid"
stop_server "$redis_server_pid"

# 2. HAProxy round-robin in front of 1, then 3 replicas (Redis limiter), at saturation.
haproxy_with() { # replica URLs...
  local port cfg i=0
  port=$(bench_free_port)
  cfg="$bench_work/haproxy-$#.cfg"
  {
    printf 'global\n    maxconn 4000\ndefaults\n    mode http\n    timeout connect 2s\n'
    printf '    timeout client 30s\n    timeout server 30s\n'
    printf 'frontend api\n    bind 127.0.0.1:%s\n    default_backend replicas\n' "$port"
    printf 'backend replicas\n    balance roundrobin\n'
    for u in "$@"; do i=$((i + 1)); printf '    server r%d %s\n' "$i" "${u#http://}"; done
  } >"$cfg"
  haproxy -db -f "$cfg" >"$bench_work/haproxy-$#.log" 2>&1 &
  haproxy_pid=$!
  bench_pids+=("$haproxy_pid")
  lb_url="http://127.0.0.1:$port"
  bench_wait_http "$lb_url/health/ready"
}
pids_cpu() { local t=0 p; for p in "$@"; do t=$(awk -v a="$t" -v b="$(cpu_seconds "$p")" 'BEGIN { print a + b }'); done; echo "$t"; }

throughput() { # replicas
  local n=$1 urls=() pids=() i
  for i in $(seq "$n"); do
    start_cloud "replica$n-$i" "${redis[@]}" MAESTRA_DB_MAX_CONNECTIONS=$((30 / n + 2))
    urls+=("$server_url"); pids+=("$server_pid")
  done
  haproxy_with "${urls[@]}"
  local m0 p0 r0 h0 a0 m1 p1 r1 h1 a1 row
  m0=$(pids_cpu "${pids[@]}"); p0=$(postgres_cpu_seconds); r0=$(cpu_seconds "$redis_pid")
  h0=$(cpu_seconds "$haproxy_pid"); a0=$(machine_busy_seconds)
  row=$(core "$n replica(s) via haproxy" "$lb_url" -c "$CONNECTIONS")
  m1=$(pids_cpu "${pids[@]}"); p1=$(postgres_cpu_seconds); r1=$(cpu_seconds "$redis_pid")
  h1=$(cpu_seconds "$haproxy_pid"); a1=$(machine_busy_seconds)
  echo "$row"
  awk -v m="$(awk -v a="$m0" -v b="$m1" 'BEGIN { print b - a }')" \
      -v p="$(awk -v a="$p0" -v b="$p1" 'BEGIN { print b - a }')" \
      -v r="$(awk -v a="$r0" -v b="$r1" 'BEGIN { print b - a }')" \
      -v h="$(awk -v a="$h0" -v b="$h1" 'BEGIN { print b - a }')" \
      -v a="$(awk -v a="$a0" -v b="$a1" 'BEGIN { print b - a }')" -v n="$n" 'BEGIN {
    printf "  CPU, %d replica(s): %.1f s busy: maestra %.0f%%, postgres %.0f%%, redis %.0f%%, haproxy %.0f%%, rest %.0f%%\n",
      n, a, 100 * m / a, 100 * p / a, 100 * r / a, 100 * h / a, 100 * (a - m - p - r - h) / a }'
  bench_result "replicas_rps_$n" "$(col 2 "$row")"
  bench_result "replicas_p99_$n" "$(col 4 "$row")"
  bench_result "replicas_errors_$n" "$(col 5 "$row")"
  last_rps=$(col 2 "$row")
  stop_server "$haproxy_pid"
  for i in "${pids[@]}"; do stop_server "$i"; done
}
throughput 1; one=$last_rps
throughput 3; three=$last_rps
awk -v a="$one" -v b="$three" -v c="$(nproc)" 'BEGIN {
  printf "throughput, 3 replicas / 1 through haproxy: %.2fx (%d cores: replicas share them)\n", b / a, c }'
redis-cli -p "$redis_port" info commandstats | awk -F'[:,=]' '/^cmdstat_evalsha/ {
  printf "Redis: %d EVALSHA calls, %.1f us each inside Redis\n", $3, $7 }'
