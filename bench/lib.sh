# shellcheck shell=bash
# Helpers shared by the bench/ scripts; sourced, never run. Loopback only: every server binds
# 127.0.0.1, every load goes there. Whatever a script starts (servers, databases, a work folder)
# is recorded here and removed on exit, by PID and by name; nothing else is touched.
#
# Results: `bench_result KEY VALUE` appends `KEY=VALUE` to $BENCH_RESULTS when it is set (that is
# how bench/run.sh collects the figures of the scripts it runs).

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$BENCH_ROOT" || exit 1

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
# The build's target folder: cargo's (CARGO_TARGET_DIR when set, relative to the repository as
# cargo reads it from here), so that the binaries run are the ones just built.
BENCH_TARGET=${CARGO_TARGET_DIR:-target}
case $BENCH_TARGET in /*) ;; *) BENCH_TARGET=$BENCH_ROOT/$BENCH_TARGET ;; esac
MAESTRA=$BENCH_TARGET/release/maestra

bench_pids=()
bench_dbs=()
bench_work=

bench_cleanup() {
  local i
  for ((i = ${#bench_pids[@]} - 1; i >= 0; i--)); do
    kill "${bench_pids[$i]}" 2>/dev/null || true
    wait "${bench_pids[$i]}" 2>/dev/null || true
  done
  for db in "${bench_dbs[@]}"; do
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  if [ -n "$bench_work" ]; then rm -rf "$bench_work"; fi
}
trap bench_cleanup EXIT

bench_need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is needed" >&2; exit 1; }
  done
}

# oha (installed if missing), jq, curl; then the release binary and the bench examples. Under
# bench/run.sh (BENCH_BUILT=1) the build was done once already.
bench_setup() {
  command -v oha >/dev/null || cargo install oha --locked
  bench_need jq curl python3
  if [ -z "${BENCH_BUILT:-}" ]; then
    cargo build --release --locked --quiet --bin maestra --example fake_provider --example hello
  fi
  # On the disk under test (BENCH_DIR, default the worktree), not a tmpfs.
  bench_work=$(mktemp -d -p "${BENCH_DIR:-$BENCH_ROOT}" maestra-bench.XXXXXX)
}

bench_result() { # key, value
  if [ -n "${BENCH_RESULTS:-}" ]; then echo "$1=$2" >>"$BENCH_RESULTS"; fi
}

bench_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until the URL answers 2xx (up to 10 s).
bench_wait_http() {
  local _
  for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "bench: $1 did not come up" >&2
  exit 1
}

# start_local NAME [VAR=value...]: a local-mode maestra with its own data folder; sets
# server_pid and server_url.
start_local() {
  local name=$1
  shift
  mkdir -p "$bench_work/$name"
  rm -f "$bench_work/$name/maestra.port" # a previous server's, when a folder is reused
  env MAESTRA_PORT=0 MAESTRA_HOST=127.0.0.1 MAESTRA_DATA_DIR="$bench_work/$name" \
    MAESTRA_LOG_LEVEL=warn "$@" "$MAESTRA" serve >"$bench_work/$name.log" 2>&1 &
  server_pid=$!
  bench_pids+=("$server_pid")
  local _
  for _ in $(seq 100); do [ -s "$bench_work/$name/maestra.port" ] && break; sleep 0.1; done
  server_url="http://127.0.0.1:$(cat "$bench_work/$name/maestra.port")"
  bench_wait_http "$server_url/health"
}

# start_cloud NAME [VAR=value...]: a cloud-mode maestra on DATABASE_URL; sets server_pid and
# server_url.
start_cloud() {
  local name=$1 port
  shift
  port=$(bench_free_port)
  env MAESTRA_MODE=cloud MAESTRA_HOST=127.0.0.1 MAESTRA_PORT="$port" MAESTRA_LOG_LEVEL=warn "$@" \
    "$MAESTRA" serve >"$bench_work/$name.log" 2>&1 &
  server_pid=$!
  bench_pids+=("$server_pid")
  server_url="http://127.0.0.1:$port"
  bench_wait_http "$server_url/health/ready"
}

# start_fake_provider: the fast fake OpenAI-compatible provider (examples/fake_provider.rs), one
# worker; sets provider (its base URL).
start_fake_provider() {
  "$BENCH_TARGET/release/examples/fake_provider" 0 1 >"$bench_work/fake.port" &
  bench_pids+=($!)
  local _
  for _ in $(seq 100); do [ -s "$bench_work/fake.port" ] && break; sleep 0.1; done
  # shellcheck disable=SC2034 # read by the scripts that source this file
  provider="http://127.0.0.1:$(head -1 "$bench_work/fake.port")"
}

# start_hello: the actix-web hello world (examples/hello.rs); sets server_pid and server_url.
start_hello() {
  "$BENCH_TARGET/release/examples/hello" 0 >"$bench_work/hello.port" &
  server_pid=$!
  bench_pids+=("$server_pid")
  local _
  for _ in $(seq 100); do [ -s "$bench_work/hello.port" ] && break; sleep 0.1; done
  server_url="http://127.0.0.1:$(head -1 "$bench_work/hello.port")"
  bench_wait_http "$server_url/"
}

# stop_server PID: stops one server this script started.
stop_server() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# A fresh database (dropped on exit), migrated by maestra; sets db_url.
bench_database() { # name prefix
  local db="$1_$$_${#bench_dbs[@]}"
  psql -q "$ADMIN_URL" -c "CREATE DATABASE $db" >/dev/null
  bench_dbs+=("$db")
  db_url="${ADMIN_URL%/*}/$db"
  DATABASE_URL=$db_url "$MAESTRA" migrate >/dev/null
}

# Machine-wide busy CPU seconds so far (all processes, all cores).
machine_busy_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%.2f", ($2 + $3 + $4 + $7 + $8) / hz }' /proc/stat
}

# oha_run NAME [oha arguments...]: runs oha (for DURATION unless -n is given) into
# $bench_work/NAME.json and prints one row: name, req/s, p50 ms, p99 ms, errors (non-2xx
# answers plus failed connections; requests cut by the deadline are not errors).
oha_run() {
  local name=$1 file="$bench_work/${1//[^A-Za-z0-9_.-]/_}.json"
  shift
  local bound=(-z "$DURATION")
  case " $* " in *" -n "*) bound=() ;; esac
  oha --no-tui --output-format json "${bound[@]}" "$@" >"$file"
  oha_row "$name" "$file"
}

oha_row() { # name, json file
  jq -r --arg name "$1" '[$name,
      (.summary.requestsPerSec | floor),
      (.latencyPercentiles.p50 * 1e6 | round / 1e3),
      (.latencyPercentiles.p99 * 1e6 | round / 1e3),
      (([.statusCodeDistribution | to_entries[] | select(.key | test("^2") | not) | .value] | add // 0)
       + ([.errorDistribution | to_entries[] | select(.key | test("deadline") | not) | .value] | add // 0))]
    | @tsv' "$2"
}

# Field N (1-based) of a row printed by oha_run.
col() { cut -f"$1" <<<"$2"; }

peak_rss_mb() { awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
rss_mb() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"
}

# CPU seconds used so far by every postgres process on the machine (shared: other users' work
# on the same server counts too).
postgres_cpu_seconds() {
  # A process may exit between the glob and the read: that is not a failure.
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v hz="$(getconf CLK_TCK)" '
    { c = $0; sub(/^[^(]*\(/, "", c); sub(/\).*$/, "", c) }
    c == "postgres" { sub(/^.*\) /, ""); t += $12 + $13 }
    END { printf "%.2f", t / hz }'
}

# The disk's own floor: 512-byte appends, each followed by fdatasync (what the file store does
# per message), one at a time for SECONDS (default 3) on the disk under test. Prints
# "rate/s p50_ms p99_ms".
fsync_floor() {
  python3 - "$bench_work/fsync.bin" "${1:-3}" <<'PY'
import os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
line, lat = b"x" * 511 + b"\n", []
start = time.perf_counter()
while time.perf_counter() - start < seconds:
    t = time.perf_counter()
    os.write(fd, line)
    os.fdatasync(fd)
    lat.append(time.perf_counter() - t)
elapsed = time.perf_counter() - start
os.close(fd)
os.unlink(path)
lat.sort()
print(f"{len(lat) / elapsed:.0f} {lat[len(lat) // 2] * 1e3:.3f} {lat[int(len(lat) * 0.99)] * 1e3:.3f}")
PY
}

# durable_floor RATE SECONDS: the durable work of local-mode core requests and nothing else, done
# the naive way (each request flushing its own file; the store before its journal), at a fixed
# rate: RATE "requests" per second spread over 16 writers (oha's -c 16) and 64 files, each
# appending a line with fdatasync, then a second one (the user's message, then the reply).
# Latency counts from the scheduled start, as oha's --latency-correction does. Prints p50 p99
# in ms: what the disk alone makes of two sequential flushes when others flush at the same time.
durable_floor() {
  python3 - "$bench_work/durable" "$1" "${2:-5}" <<'PY'
import os, sys, threading, time
folder, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
os.makedirs(folder, exist_ok=True)
writers, files = 16, 64
fds = [os.open(f"{folder}/{i}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) for i in range(files)]
line, gap, lat, lock = b"x" * 299 + b"\n", writers / rate, [], threading.Lock()
start = time.perf_counter() + 0.1
def writer(w):
    mine, due, n = [], start + w * gap / writers, 0
    while due < start + seconds:
        time.sleep(max(0.0, due - time.perf_counter()))
        fd = fds[(w + n * writers) % files]
        for _ in range(2):
            os.write(fd, line)
            os.fdatasync(fd)
        mine.append(time.perf_counter() - due)
        due, n = due + gap, n + 1
    with lock:
        lat.extend(mine)
threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
for t in threads: t.start()
for t in threads: t.join()
for fd in fds: os.close(fd)
lat.sort()
print(f"{lat[len(lat) // 2] * 1e3:.3f} {lat[int(len(lat) * 0.99)] * 1e3:.3f}")
PY
  rm -rf "$bench_work/durable"
}

# Core request bodies: COUNT conversations named PREFIX_1..COUNT, one body per line (oha -Z).
core_bodies() { # prefix, count, [extra JSON fields]
  local i
  for i in $(seq "$2"); do
    printf '{"user_id":"bench","surface_id":"cli","conversation_id":"%s_%d","message":"Hello, how is the project going?"%s}\n' \
      "$1" "$i" "${3:-}"
  done
}

bench_header() { # title
  echo "$1: $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

# start_cloud_at PORT NAME [VAR=value...]: start_cloud on a port chosen by the caller (a cloud
# stopped and started again on its address, as bench/sync.sh does); sets server_pid and
# server_url.
start_cloud_at() {
  local port=$1 name=$2
  shift 2
  env MAESTRA_MODE=cloud MAESTRA_HOST=127.0.0.1 MAESTRA_PORT="$port" MAESTRA_LOG_LEVEL=warn "$@" \
    "$MAESTRA" serve >>"$bench_work/$name.log" 2>&1 &
  server_pid=$!
  bench_pids+=("$server_pid")
  server_url="http://127.0.0.1:$port"
  bench_wait_http "$server_url/health/ready"
}

# forget_pid PID: a process stopped already (stop_server) is not signalled again on exit.
forget_pid() {
  local i
  for i in "${!bench_pids[@]}"; do
    if [ "${bench_pids[$i]}" = "$1" ]; then unset 'bench_pids[i]'; fi
  done
  bench_pids=("${bench_pids[@]}")
}

# Milliseconds since the epoch.
now_ms() { date +%s%3N; }

# The WAL position now, on URL's server.
wal_lsn() { psql -Atq "$1" -c "SELECT pg_current_wal_lsn()"; }

# wal_bytes URL FROM_LSN TO_LSN: the WAL bytes (records with their page images) between two
# positions that belong to URL's database: records of its relations, and every record (commit,
# sequence) of a transaction that wrote one. Other databases on the same server are left out.
# Needs pg_walinspect (PostgreSQL 15 contrib); prints "bytes transactions".
wal_bytes() {
  psql -Atq "$1" -v from="$2" -v to="$3" <<'SQL'
SET client_min_messages TO warning;
CREATE EXTENSION IF NOT EXISTS pg_walinspect;
WITH db AS (SELECT '%/' || oid || '/%' AS rel FROM pg_database WHERE datname = current_database()),
r AS (SELECT xid, record_length, block_ref FROM pg_get_wal_records_info(:'from', :'to')),
mine AS (SELECT DISTINCT xid FROM r, db WHERE r.block_ref LIKE db.rel AND xid <> '0')
SELECT coalesce(sum(record_length), 0) || ' ' || (SELECT count(*) FROM mine)
FROM r, db WHERE r.block_ref LIKE db.rel OR r.xid IN (SELECT xid FROM mine);
SQL
}

# db_counters URL: its database's committed transactions and rows inserted, updated (HOT
# included) and HOT-updated so far: "xacts inserted updated hot".
db_counters() {
  psql -Atq "$1" -c "SELECT pg_stat_clear_snapshot()" -c "SELECT
      (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) || ' ' ||
      coalesce(sum(n_tup_ins), 0) || ' ' || coalesce(sum(n_tup_upd), 0) || ' ' ||
      coalesce(sum(n_tup_hot_upd), 0) FROM pg_stat_user_tables" | tail -1
}
