#!/usr/bin/env bash
# Thousands of turns in flight at once (issue 17, measurement only): each turn relays a slow
# model reply. A slow fake OpenAI-compatible provider (examples/slow_provider.rs) waits DELAY_MS
# before its first byte, then writes CHUNKS pieces INTERVAL_MS apart (streamed when asked, else
# one JSON answer after the same time). oha keeps INFLIGHT connections busy (TURNS requests in
# all) against the provider directly (the baseline, same run) and through maestra's core
# endpoint, plain and streamed (Accept: text/event-stream), a fresh maestra per scenario so that
# its peak RSS (VmHWM) is the scenario's own; its idle RSS (after a small warm-up) is taken
# off. CPU seconds per turn: maestra's and the provider's (/proc/<pid>/stat, before and after),
# in cloud mode also every postgres process's on the machine (shared: others' work counts).
#   bench/inflight.sh                                  # 1000 in flight, local mode
#   INFLIGHT=2000 TURNS=10000 MODES="local cloud" bench/inflight.sh
#   DELAY_MS=200 CHUNKS=21 INTERVAL_MS=50 bench/inflight.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup
if [ -z "${BENCH_BUILT:-}" ]; then
  cargo build --release --locked --quiet --example slow_provider
fi

INFLIGHT=${INFLIGHT:-1000}
TURNS=${TURNS:-$((INFLIGHT * 4))}
DELAY_MS=${DELAY_MS:-200}
CHUNKS=${CHUNKS:-21}
INTERVAL_MS=${INTERVAL_MS:-50}
MODES=${MODES:-local}

# oha's connections, maestra's to the provider and the provider's own, each a descriptor: raise
# the soft limit to the hard one (inherited by everything started below).
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((INFLIGHT * 2 + 256)) ]; then
  echo "bench: ulimit -n is $(ulimit -n), too low for $INFLIGHT turns in flight" >&2
  exit 1
fi

"$BENCH_TARGET/release/examples/slow_provider" 0 1 "$DELAY_MS" "$CHUNKS" "$INTERVAL_MS" \
  >"$bench_work/slow.port" &
provider_pid=$!
bench_pids+=("$provider_pid")
for _ in $(seq 100); do [ -s "$bench_work/slow.port" ] && break; sleep 0.1; done
provider="http://127.0.0.1:$(head -1 "$bench_work/slow.port")"

llm=(MAESTRA_LLM_BASE_URL="$provider/v1" MAESTRA_LLM_MODEL=bench-model
  MAESTRA_LLM_PRICE_INPUT=0.15 MAESTRA_LLM_PRICE_OUTPUT=0.60
  MAESTRA_LLM_REQUEST_TIMEOUT=120)
# One conversation per connection: turns of a conversation do not pile up on each other.
core_bodies inflight "$INFLIGHT" >"$bench_work/bodies.jsonl"
direct_body() { # stream: true|false
  local extra=""
  if [ "$1" = true ]; then extra=',"stream_options":{"include_usage":true}'; fi
  printf '{"model":"bench-model","messages":[{"role":"system","content":"You are Maestra."},{"role":"user","content":"Hello, how is the project going?"}],"stream":%s%s}' \
    "$1" "$extra"
}

# The machine's TCP accept-queue drops so far (ListenDrops: a full listen backlog; the client's
# SYN is then retried after ~1 s, which shows as a p99 of a turn plus a second).
listen_drops() {
  awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) k[i] = $i; h = 1 } else
    for (i = 1; i <= NF; i++) if (k[i] == "ListenDrops") print $i }' /proc/net/netstat
}

ms_per_turn() { # cpu seconds before, after
  awk -v a="$1" -v b="$2" -v n="$TURNS" 'BEGIN { printf "%.3f", (b - a) * 1e3 / n }'
}

# row NAME PID|- [oha arguments...]: one scenario; PID is maestra's (- for the baseline).
row() {
  local name=$1 pid=$2 idle="" p0 p1 s0="" s1 r server_cpu="-" rss="-" per_turn="-"
  local g0="" pg_cpu="-" l0
  shift 2
  if [ "$pid" != - ]; then
    idle=$(rss_mb "$pid")
    s0=$(cpu_seconds "$pid")
  fi
  p0=$(cpu_seconds "$provider_pid")
  l0=$(listen_drops)
  if [ "$mode" = cloud ]; then g0=$(postgres_cpu_seconds); fi
  # -t: a turn that hangs is an error after 60 s, so the run stays bounded in time.
  r=$(oha_run "$name" -n "$TURNS" -c "$INFLIGHT" -t 60s "$@")
  p1=$(cpu_seconds "$provider_pid")
  if [ -n "$g0" ]; then pg_cpu=$(ms_per_turn "$g0" "$(postgres_cpu_seconds)"); fi
  if [ "$pid" != - ]; then
    s1=$(cpu_seconds "$pid")
    server_cpu=$(ms_per_turn "$s0" "$s1")
    read -r rss per_turn < <(awk -v h="$(peak_rss_mb "$pid")" -v i="$idle" -v n="$INFLIGHT" \
      'BEGIN { printf "%.1f %.1f\n", h - i, (h - i) * 1024 / n }')
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$rss" "$per_turn" "$server_cpu" \
    "$(ms_per_turn "$p0" "$p1")" "$pg_cpu" "$(($(listen_drops) - l0))"
  local key=${name//[^A-Za-z0-9_]/_}
  bench_result "inflight_${key}_rps" "$(col 2 "$r")"
  bench_result "inflight_${key}_p99_ms" "$(col 4 "$r")"
  bench_result "inflight_${key}_errors" "$(col 5 "$r")"
  if [ "$pid" != - ]; then
    bench_result "inflight_${key}_rss_kb_per_turn" "$per_turn"
    bench_result "inflight_${key}_cpu_ms_per_turn" "$server_cpu"
  fi
}

# fresh MODE NAME: a new maestra through the slow provider, warmed up by a few turns; sets
# server_pid, url and auth.
fresh() {
  local mode=$1 name=$2
  auth=()
  if [ "$mode" = cloud ]; then
    bench_database "bench_inflight_$name"
    local key
    key=$(DATABASE_URL=$db_url "$MAESTRA" keys create --tenant bench \
      --rate-limit 100000000/60 2>/dev/null)
    auth=(-H "X-API-Key: $key")
    start_cloud "$name" DATABASE_URL="$db_url" "${llm[@]}"
  else
    start_local "$name" "${llm[@]}"
  fi
  url=$server_url
  oha --no-tui -n 8 -c 4 "${auth[@]}" -m POST -H 'Content-Type: application/json' \
    -Z "$bench_work/bodies.jsonl" "$url/api/maestra/core" >/dev/null
}

bench_header "maestra turns-in-flight benchmark ($INFLIGHT in flight, $TURNS turns per scenario)"
echo "(slow fake provider: first byte after ${DELAY_MS} ms, $CHUNKS chunks ${INTERVAL_MS} ms apart;" \
  "provider, maestra and oha share the machine)"
printf 'scenario\tturns/s\tp50 ms\tp99 ms\terrors\tRSS +MB\tKB/turn in flight\tmaestra CPU ms/turn\tprovider CPU ms/turn\tpostgres CPU ms/turn\tlisten drops\n'
mode=direct
row "direct plain" - -m POST -H 'Content-Type: application/json' -d "$(direct_body false)" \
  "$provider/v1/chat/completions"
row "direct streamed" - -m POST -H 'Content-Type: application/json' \
  -A text/event-stream -d "$(direct_body true)" "$provider/v1/chat/completions"
for mode in $MODES; do
  fresh "$mode" "${mode}_plain"
  row "$mode plain" "$server_pid" "${auth[@]}" -m POST -H 'Content-Type: application/json' \
    -Z "$bench_work/bodies.jsonl" "$url/api/maestra/core"
  stop_server "$server_pid"
  forget_pid "$server_pid"
  fresh "$mode" "${mode}_streamed"
  row "$mode streamed" "$server_pid" "${auth[@]}" -m POST -H 'Content-Type: application/json' \
    -A text/event-stream -Z "$bench_work/bodies.jsonl" "$url/api/maestra/core"
  stop_server "$server_pid"
  forget_pid "$server_pid"
done
echo "floor: one turn takes $((DELAY_MS + CHUNKS * INTERVAL_MS)) ms at the provider;" \
  "$INFLIGHT in flight allow at most $((INFLIGHT * 1000 / (DELAY_MS + CHUNKS * INTERVAL_MS))) turns/s"
