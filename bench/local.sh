#!/usr/bin/env bash
# Local-mode HTTP benchmark against the release binary, loopback only, bounded in time.
# In one run: the disk's append+fsync floor, an actix-web hello world (examples/hello.rs, the
# HTTP floor), maestra's /health, the core endpoint with the offline responder (64
# conversations), and the same core requests streamed (SSE). Prints req/s, p50, p99, errors,
# the server's peak RSS, and the ratios to the floors.
#   bench/local.sh                 # 10 s per scenario, 32 connections
#   DURATION=30s CONNECTIONS=64 bench/local.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup

core_bodies conv_bench 64 >"$bench_work/bodies.jsonl"
core_bodies conv_stream 64 ',"stream":true' >"$bench_work/stream.jsonl"

bench_header "maestra local-mode benchmark ($DURATION per scenario, $CONNECTIONS connections)"
read -r fsync_rate fsync_p50 fsync_p99 < <(fsync_floor 3)
echo "disk floor: append+fdatasync one at a time: $fsync_rate/s, p50 $fsync_p50 ms, p99 $fsync_p99 ms (each core request makes 2)"
printf 'scenario\treq/s\tp50 ms\tp99 ms\terrors\n'

start_hello
hello=$(oha_run "hello world (actix)" -c "$CONNECTIONS" "$server_url/"); echo "$hello"
stop_server "$server_pid"

start_local data
health=$(oha_run "maestra /health" -c "$CONNECTIONS" "$server_url/health"); echo "$health"
core=$(oha_run "core" -c "$CONNECTIONS" -m POST -H 'Content-Type: application/json' \
  -Z "$bench_work/bodies.jsonl" "$server_url/api/maestra/core"); echo "$core"
core_rss=$(peak_rss_mb "$server_pid")
stream=$(oha_run "core, streamed" -c "$CONNECTIONS" -m POST -H 'Content-Type: application/json' \
  -Z "$bench_work/stream.jsonl" "$server_url/api/maestra/core"); echo "$stream"
rss=$(peak_rss_mb "$server_pid")
events=$(curl -fsN -H 'Content-Type: application/json' -d "$(head -1 "$bench_work/stream.jsonl")" \
  "$server_url/api/maestra/core" | grep -c '^event:' || true)
echo "(a streamed answer here carries $events SSE events)"
echo "server peak RSS: $core_rss MB after core, $rss MB after streaming"

awk -v h="$(col 2 "$health")" -v w="$(col 2 "$hello")" -v c="$(col 2 "$core")" \
  -v s="$(col 2 "$stream")" -v f="$fsync_rate" 'BEGIN {
  printf "ratios: /health / hello world %.2f; core / append+fsync floor %.2f; core / /health %.3f; streamed / core %.2f\n",
    h / w, c / f, c / h, s / c }'

bench_result fsync_rate "$fsync_rate"
bench_result fsync_p50 "$fsync_p50"
bench_result hello_rps "$(col 2 "$hello")"
bench_result hello_p99 "$(col 4 "$hello")"
bench_result health_rps "$(col 2 "$health")"
bench_result health_p99 "$(col 4 "$health")"
bench_result health_errors "$(col 5 "$health")"
bench_result local_core_rps "$(col 2 "$core")"
bench_result local_core_p50 "$(col 3 "$core")"
bench_result local_core_p99 "$(col 4 "$core")"
bench_result local_core_errors "$(col 5 "$core")"
bench_result local_core_rss "$core_rss"
bench_result stream_rps "$(col 2 "$stream")"
bench_result stream_p99 "$(col 4 "$stream")"
bench_result stream_errors "$(col 5 "$stream")"
bench_result local_rss "$rss"
