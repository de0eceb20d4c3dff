#!/usr/bin/env bash
# Two maestra binaries side by side (say, main and a change to the store), local mode, through
# the fast fake provider, in one run: ROUNDS alternating rounds at a fixed RATE, then each at
# saturation, with the disk flushes (fdatasync + fsync) each makes per answered request, counted
# by `perf stat` when perf is installed. Both servers stay up the whole time, on the same disk.
#   bench/compare.sh OLD_BINARY NEW_BINARY
#   ROUNDS=4 RATE=500 DURATION=10s bench/compare.sh /tmp/maestra-main target/release/maestra
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
if [ $# -ne 2 ] || [ ! -x "$1" ] || [ ! -x "$2" ]; then
  echo "usage: bench/compare.sh OLD_BINARY NEW_BINARY (two maestra executables)" >&2
  exit 2
fi
binaries=("$(realpath "$1")" "$(realpath "$2")")
bench_setup

RATE=${RATE:-500}
ROUNDS=${ROUNDS:-3}

start_fake_provider

names=(old new)
urls=()
pids=()
for i in 0 1; do
  MAESTRA=${binaries[$i]} start_local "${names[$i]}" \
    MAESTRA_LLM_BASE_URL="$provider/v1" MAESTRA_LLM_MODEL=bench-model
  urls+=("$server_url")
  pids+=("$server_pid")
done
core_bodies conv_bench 64 >"$bench_work/bodies.jsonl"

# load NAME INDEX [oha arguments...]: one row, with the flushes per request when perf can count.
load() {
  local name=$1 i=$2 file="$bench_work/${1//[^A-Za-z0-9_.-]/_}.json" flushes=-
  shift 2
  local oha_args=(--no-tui --output-format json -z "$DURATION" "$@" -m POST
    -H 'Content-Type: application/json' -Z "$bench_work/bodies.jsonl" "${urls[$i]}/api/maestra/core")
  if command -v perf >/dev/null; then
    perf stat -x, -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync -p "${pids[$i]}" \
      -o "$bench_work/perf.txt" -- oha "${oha_args[@]}" >"$file"
    flushes=$(awk -F, '/sys_enter_f/ { n += $1 } END { print n + 0 }' "$bench_work/perf.txt")
  else
    oha "${oha_args[@]}" >"$file"
  fi
  local answered
  answered=$(jq '.statusCodeDistribution["200"] // 0' "$file")
  printf '%s\t%s\n' "$(oha_row "$name" "$file")" \
    "$(awk -v f="$flushes" -v n="$answered" 'BEGIN { if (f == "-" || n == 0) print "-"; else printf "%.2f", f / n }')"
}

bench_header "maestra compare: old ${binaries[0]} / new ${binaries[1]} ($DURATION per run)"
printf 'scenario\treq/s\tp50 ms\tp99 ms\terrors\tflushes/request\n'
for i in 0 1; do # warm-up: connection pools, conversation files, history windows
  oha --no-tui -z 2s -c 8 -m POST -H 'Content-Type: application/json' \
    -Z "$bench_work/bodies.jsonl" "${urls[$i]}/api/maestra/core" >/dev/null
done
for round in $(seq "$ROUNDS"); do
  for i in 0 1; do
    load "${names[$i]}@${RATE}/s #$round" "$i" -q "$RATE" -c 16 --latency-correction
  done
done
for i in 0 1; do
  load "${names[$i]}@${CONNECTIONS}c" "$i" -c "$CONNECTIONS"
done
echo "peak RSS: old $(peak_rss_mb "${pids[0]}") MB, new $(peak_rss_mb "${pids[1]}") MB"
