#!/usr/bin/env bash
# Disk flushes per answered request in local mode, with and without `Idempotency-Key` (as
# `maestra ask` and the MCP server send on every request), through the fast fake provider:
# REQUESTS requests from THREADS keep-alive clients, every key new; flushes (fdatasync + fsync
# of the server process) counted by `perf stat`. One binary, or two side by side (before and
# after a change), each with its own data folder, in one run.
#   bench/keyed.sh [BINARY [BINARY]]        (default: target/release/maestra)
#   REQUESTS=4000 THREADS=16 bench/keyed.sh /tmp/maestra-main target/release/maestra
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
binaries=("$@")
if [ ${#binaries[@]} -eq 0 ]; then binaries=("$MAESTRA"); fi
for binary in "${binaries[@]}"; do
  [ -x "$binary" ] || { echo "usage: bench/keyed.sh [BINARY [BINARY]] (maestra executables)" >&2; exit 2; }
done
bench_setup
bench_need perf
REQUESTS=${REQUESTS:-3000}
THREADS=${THREADS:-16}

start_fake_provider

# The load: load.py URL KEYED REQUESTS THREADS posts from THREADS keep-alive clients (a new
# key each when KEYED is 1) and prints how many were answered 200.
cat >"$bench_work/load.py" <<'EOF'
import http.client, json, sys, threading, uuid
url, keyed, total, threads = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
host, port = url.removeprefix("http://").split(":")
answered = [0] * threads
def client(t):
    connection = http.client.HTTPConnection(host, int(port))
    for i in range(t, total, threads):
        body = json.dumps({"user_id": "bench", "surface_id": "cli",
                           "conversation_id": f"conv_keyed_{i % 64}",
                           "message": "Hello, how is the project going?"})
        headers = {"Content-Type": "application/json"}
        if keyed:
            headers["Idempotency-Key"] = str(uuid.uuid4())
        connection.request("POST", "/api/maestra/core", body, headers)
        response = connection.getresponse()
        response.read()
        answered[t] += response.status == 200
workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(sum(answered))
EOF

bench_header "maestra keyed: flushes per request with and without Idempotency-Key ($REQUESTS requests, $THREADS clients)"
printf 'binary\tkey\tanswered\tflushes/request\tkeyed/plain\n'
for i in "${!binaries[@]}"; do
  MAESTRA=$(realpath "${binaries[$i]}") start_local "server$i" \
    MAESTRA_LLM_BASE_URL="$provider/v1" MAESTRA_LLM_MODEL=bench-model
  python3 "$bench_work/load.py" "$server_url" 0 200 "$THREADS" >/dev/null # warm-up: files, connections
  plain=
  for keyed in 0 1; do
    answered=$(perf stat -x, -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync \
      -p "$server_pid" -o "$bench_work/perf.txt" -- \
      python3 "$bench_work/load.py" "$server_url" "$keyed" "$REQUESTS" "$THREADS")
    flushes=$(awk -F, '/sys_enter_f/ { n += $1 } END { print n + 0 }' "$bench_work/perf.txt")
    per=$(awk -v f="$flushes" -v n="$answered" 'BEGIN { printf "%.3f", (n ? f / n : 0) }')
    if [ "$keyed" = 0 ]; then plain=$per; ratio=-; else
      ratio=$(awk -v k="$per" -v p="$plain" 'BEGIN { printf "%.3f", (p > 0 ? k / p : 0) }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "${binaries[$i]}" "$([ "$keyed" = 1 ] && echo yes || echo no)" \
      "$answered" "$per" "$ratio"
    bench_result "keyed_${i}_${keyed}_flushes_per_request" "$per"
  done
  stop_server "$server_pid"
done
