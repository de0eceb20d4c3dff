#!/usr/bin/env bash
# Sync between a local server and the cloud (issue 13), release build, loopback only, one cloud
# on a fresh Postgres database, every figure next to a baseline measured in the same run:
#   1. converge after reconnecting with 1,000 pending records (500 turns made while the cloud
#      was stopped): from the cloud answering again to `sync now` reporting ok, 0 pending, and
#      the cloud holding all 1,000 (target <= 5 s). Baseline: psql inserting the same 1,000 rows
#      with the server's own statement, one transaction. Then the same left to itself (no
#      `sync now`: the backoff decides).
#   2. a new install pulling a 10,000-message history pushed by another install: from
#      `maestra sync setup` to `pulled: 10000` (target <= 10 s). Baseline: psql reading the
#      same 10,000 rows in one transaction.
#   3. a sync round with nothing to do, through a byte-counting TCP forwarder: requests and
#      bytes both ways, HTTP headers included (target: 1 request, <= 1 KiB); right after another
#      round, and after the cloud's keep-alive (5 s) has closed the connection. Baseline: a bare
#      GET /health/live through the same forwarder.
#   4. the local turn (offline responder, 64 conversations) at a fixed RATE with sync on (the
#      cloud taking the pushes meanwhile) vs a twin server with MAESTRA_SYNC=off: ROUNDS
#      alternating pairs, the pushes drained between runs; then both loaded at once (the same
#      machine weather for both); then each at saturation, with where the CPU went (target
#      <= 1.05x). The cloud shares the machine: its CPU comes out of the local server's.
#   bench/sync.sh                                  # 10 s per run, 500 req/s, 5 rounds
#   DURATION=20s RATE=500 ROUNDS=5 bench/sync.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup
bench_need psql

RATE=${RATE:-500}
ROUNDS=${ROUNDS:-5}
PENDING_TURNS=${PENDING_TURNS:-500}
HISTORY=${HISTORY:-10000}

bench_database bench_sync
cloud_db=$db_url
# A key as `maestra keys create` makes them (80 characters): its length is on the wire.
key=$(python3 -c 'import secrets; print(f"mk_{secrets.token_hex(6)}_{secrets.token_hex(32)}")')
metrics_token=bench-sync-metrics
cloud_port=$(bench_free_port)
cloud_env=(DATABASE_URL="$cloud_db" MAESTRA_API_KEY="$key" MAESTRA_METRICS_TOKEN="$metrics_token"
  MAESTRA_RATE_LIMIT_REQUESTS=1000000 MAESTRA_SYNC_RATE_LIMIT_REQUESTS=1000000)
start_cloud_at "$cloud_port" cloud "${cloud_env[@]}"
cloud_url=$server_url
cloud_pid=$server_pid

# --- helpers ---------------------------------------------------------------------------------

# sync_setup FOLDER CLOUD_URL USER: `maestra sync setup`, the key on standard input, for the
# local server running on FOLDER (it starts a round at once).
sync_setup() {
  printf '%s\n' "$key" | env -u MAESTRA_API_KEY -u MAESTRA_LOCAL_URL MAESTRA_DATA_DIR="$bench_work/$1" \
    "$MAESTRA" sync setup --url "$2" --user "$3" >>"$bench_work/setup.log" 2>&1
}
sync_status() { curl -fs "$1/api/maestra/sync"; }
sync_now() { curl -fs -X POST "$1/api/maestra/sync/now"; }
# until_synced URL [SECONDS]: `sync now` until a round ends ok with nothing pending; prints the
# status then.
until_synced() {
  local deadline=$(($(date +%s) + ${2:-120})) status
  while :; do
    status=$(sync_now "$1" || true)
    if jq -e '.state == "ok" and .pending == 0' <<<"$status" >/dev/null 2>&1; then
      echo "$status"
      return 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "bench: sync with $1 did not complete: $status" >&2
      return 1
    fi
    sleep 0.05
  done
}
# Core bodies of one user: COUNT conversations PREFIX_1..COUNT.
user_bodies() { core_bodies "$2" "$3" | sed "s/\"user_id\":\"bench\"/\"user_id\":\"$1\"/"; }
# Messages the cloud holds for a user.
cloud_count() {
  psql -XAtq "$cloud_db" -c "SELECT count(*) FROM messages m JOIN owners o ON o.id = m.owner_id
    WHERE o.tenant_id = 'default' AND o.user_id = '$1'"
}
# Sum and count of the cloud's request durations for a route (its Prometheus histogram).
cloud_route_seconds() {
  curl -fs -H "Authorization: Bearer $metrics_token" "$cloud_url/metrics" | awk -v route="$1" '
    /^maestra_http_request_duration_seconds_(sum|count)/ && index($0, "route=\"" route "\"") {
      if ($0 ~ /_sum/) s += $NF; else c += $NF }
    END { printf "%.3f %d\n", s, c }'
}
ms_since() { echo $(($(now_ms) - $1)); }
seconds_of() { awk -v ms="$1" 'BEGIN { printf "%.2f", ms / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }

bench_header "maestra sync benchmark ($DURATION per load run, $RATE req/s, $ROUNDS rounds)"
echo "(cloud, postgres, local servers, oha and the forwarder share the machine; load average is others' work too)"

# --- 1. converge after reconnecting with 1,000 pending records -------------------------------
echo
echo "== 1. convergence after reconnecting, $((PENDING_TURNS * 2)) pending records"
start_local m1
m1=$server_url
m1_pid=$server_pid
sync_setup m1 "$cloud_url" away
until_synced "$m1" >/dev/null
user_bodies away conv_away 64 >"$bench_work/away.jsonl"

# away_turns: the cloud stops, PENDING_TURNS turns are made locally; prints how long the cloud
# has been away once the local server counts them pending.
cloud_away() {
  stop_server "$cloud_pid"
  forget_pid "$cloud_pid"
  away_since=$(now_ms)
  local row pending
  row=$(oha_run "$1" -n "$PENDING_TURNS" -c 8 -m POST -H 'Content-Type: application/json' \
    -Z "$bench_work/away.jsonl" "$m1/api/maestra/core")
  if [ "$(col 5 "$row")" != 0 ]; then echo "bench: turns failed: $row" >&2; exit 1; fi
  pending=$(sync_now "$m1" | jq -c '{state, pending}')
  echo "cloud stopped; $PENDING_TURNS local turns ($(col 2 "$row") req/s); sync now: $pending"
}
cloud_back() {
  local started
  started=$(now_ms)
  start_cloud_at "$cloud_port" cloud "${cloud_env[@]}"
  cloud_pid=$server_pid
  back_at=$(now_ms)
  echo "cloud started again after $(seconds_of $((started - away_since))) s away, ready in $(seconds_of $((back_at - started))) s"
}

cloud_away "turns while the cloud is away"
cloud_back
read -r push0_s push0_n < <(cloud_route_seconds /api/maestra/sync/push)
read -r pull0_s pull0_n < <(cloud_route_seconds /api/maestra/sync/pull)
until_synced "$m1" 60 >"$bench_work/m1.status"
converge_ms=$(ms_since "$back_at")
read -r push1_s push1_n < <(cloud_route_seconds /api/maestra/sync/push)
read -r pull1_s pull1_n < <(cloud_route_seconds /api/maestra/sync/pull)
held=$(cloud_count away)
echo "asked (sync now from the moment the cloud is ready): converged in $(seconds_of "$converge_ms") s; cloud holds $held messages of the user; status $(jq -c '{state, pending, pushed, pulled}' "$bench_work/m1.status")"
awk -v ps="$((push1_n - push0_n))" -v pt="$(awk -v a="$push0_s" -v b="$push1_s" 'BEGIN { print b - a }')" \
  -v ls="$((pull1_n - pull0_n))" -v lt="$(awk -v a="$pull0_s" -v b="$pull1_s" 'BEGIN { print b - a }')" \
  -v total="$converge_ms" 'BEGIN {
    printf "  of which in the cloud'"'"'s handlers: %d push requests %.0f ms, %d pull requests %.0f ms (%.0f%% of the time)\n",
      ps, pt * 1000, ls, lt * 1000, 100 * (pt + lt) * 1000 / total }'
if [ "$held" -ne $((PENDING_TURNS * 2)) ]; then
  echo "bench: the cloud holds $held messages, not $((PENDING_TURNS * 2))" >&2
  exit 1
fi

# The same again, left to itself: no `sync now`, the next retry is what the backoff says.
cloud_away "turns while the cloud is away, again"
sleep "${AWAY_SECONDS:-5}"
cloud_back
deadline=$(($(date +%s) + 360))
while ! sync_status "$m1" | jq -e '.state == "ok" and .pending == 0' >/dev/null; do
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "bench: no convergence left alone" >&2; exit 1; fi
  sleep 0.02
done
alone_ms=$(ms_since "$back_at")
echo "left to itself (retry with backoff): converged $(seconds_of "$alone_ms") s after the cloud was ready; cloud holds $(cloud_count away) messages of the user"

# Baseline: the same 1,000 rows (the first round's, taken from the cloud) inserted by psql for
# another user with the server's own statement (src/sync/cloud.rs `store_message`), one
# statement per row in one transaction; then the whole lot in one INSERT ... SELECT.
psql -XAtq "$cloud_db" >"$bench_work/floor.sql" <<SQL
SELECT format('EXECUTE store(:owner, %L, %L, %L, %L, %L, %L, %L, %L, %L, %s, %s, %s, NULL, %L);',
    'default', c.id, 'floor', m.id, m.role, m.surface_id,
    m.created_at, m.content, m.model, coalesce(m.prompt_tokens::text, 'NULL'),
    coalesce(m.completion_tokens::text, 'NULL'), coalesce(m.cost_usd::text, 'NULL'), m.origin)
FROM messages m JOIN conversations c ON c.pk = m.conversation_pk JOIN owners o ON o.id = m.owner_id
WHERE o.tenant_id = 'default' AND o.user_id = 'away'
ORDER BY m.feed_seq LIMIT $((PENDING_TURNS * 2));
SQL
{
  echo '\set ON_ERROR_STOP 1'
  echo 'BEGIN;'
  echo "INSERT INTO owners AS o (tenant_id, user_id) VALUES ('default', 'floor')
    ON CONFLICT (tenant_id, user_id) DO UPDATE SET feed_head = o.feed_head RETURNING id AS owner \gset"
  cat <<'SQL'
PREPARE store(bigint, text, text, text, text, text, text, timestamptz, text, text, bigint, bigint,
    double precision, text, text) AS
WITH deleted AS (
    SELECT 1 FROM conversation_deletions
    WHERE owner_id = $1 AND conversation_id = $3 AND deleted_at >= $8
), existing AS (
    SELECT 1 FROM messages m JOIN conversations c ON c.pk = m.conversation_pk
    WHERE c.tenant_id = $2 AND c.user_id = $4 AND c.id = $3 AND m.id = $5
), owner AS (
    UPDATE owners SET feed_head = feed_head + 1
    WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM deleted)
        AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING id, feed_head
), conversation AS (
    INSERT INTO conversations AS c (tenant_id, id, user_id, owner_id, last_seq, last_created_at)
    SELECT $2, $3, $4, owner.id, 1, $8 FROM owner
    ON CONFLICT (tenant_id, user_id, id) DO UPDATE
        SET last_seq = c.last_seq + 1, updated_at = now(),
            last_created_at = GREATEST(c.last_created_at, EXCLUDED.last_created_at)
    RETURNING pk, last_seq
), message AS (
    INSERT INTO messages (conversation_pk, seq, id, role, surface_id, content,
        created_at, model, prompt_tokens, completion_tokens, cost_usd, api_key_id,
        owner_id, feed_seq, origin)
    SELECT conversation.pk, conversation.last_seq, $5, $6, $7, $9, $8, $10, $11, $12,
        $13, $14, owner.id, owner.feed_head, $15
    FROM conversation, owner
    RETURNING 1
)
SELECT (SELECT count(*) FROM message) AS added, (SELECT count(*) FROM existing) AS duplicate;
SQL
  cat "$bench_work/floor.sql"
  echo 'COMMIT;'
} >"$bench_work/floor_run.sql"
t0=$(now_ms)
psql -Xq "$cloud_db" -f "$bench_work/floor_run.sql" >/dev/null
floor_ms=$(ms_since "$t0")
t0=$(now_ms)
psql -Xq "$cloud_db" >/dev/null <<SQL
BEGIN;
CREATE TEMP TABLE floor_copy (LIKE messages INCLUDING ALL);
INSERT INTO floor_copy SELECT m.* FROM messages m JOIN owners o ON o.id = m.owner_id
  WHERE o.tenant_id = 'default' AND o.user_id = 'away' ORDER BY m.feed_seq LIMIT $((PENDING_TURNS * 2));
COMMIT;
SQL
bulk_ms=$(ms_since "$t0")
echo "baseline: psql, the same $((PENDING_TURNS * 2)) rows with the server's statement, one per row, one transaction: $floor_ms ms ($(cloud_count floor) stored); one INSERT ... SELECT: $bulk_ms ms"
echo "convergence / baseline: asked $(ratio "$converge_ms" "$floor_ms")x, left to itself $(ratio "$alone_ms" "$floor_ms")x"
stop_server "$m1_pid"
forget_pid "$m1_pid"

# --- 2. a new install pulls a 10,000-message history -----------------------------------------
echo
echo "== 2. a new install pulling $HISTORY messages"
python3 - "$HISTORY" "$bench_work/history" <<'PY'
import json, os, sys
count, folder = int(sys.argv[1]), sys.argv[2]
os.makedirs(folder, exist_ok=True)
for batch in range((count + 499) // 500):
    records = []
    for n in range(batch * 500, min(count, batch * 500 + 500)):
        records.append({"kind": "message", "user_id": "hist", "conversation_id": f"conv_h{n % 20}",
            "id": f"msg_h{n:05}", "role": "user" if n % 2 == 0 else "assistant", "surface_id": "cli",
            "content": f"message {n} of the history",
            "created_at": f"2026-10-{1 + n // 1440:02}T{(n // 60) % 24:02}:{n % 60:02}:00Z"})
    with open(f"{folder}/{batch:03}.json", "w") as f:
        json.dump({"origin": "inst_old_laptop", "records": records}, f)
PY
t0=$(now_ms)
for file in "$bench_work"/history/*.json; do
  curl -fs -o /dev/null -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    --data-binary @"$file" "$cloud_url/api/maestra/sync/push"
done
push_ms=$(ms_since "$t0")
echo "pushed by another install: $(cloud_count hist) messages in $(((HISTORY + 499) / 500)) pushes of 500, $(seconds_of "$push_ms") s"
start_local m2
m2=$server_url
m2_pid=$server_pid
read -r pull0_s pull0_n < <(cloud_route_seconds /api/maestra/sync/pull)
t0=$(now_ms)
sync_setup m2 "$cloud_url" hist &
setup_pid=$!
deadline=$(($(date +%s) + 120))
while :; do
  status=$(sync_status "$m2")
  if jq -e --argjson n "$HISTORY" '.pulled >= $n' <<<"$status" >/dev/null; then break; fi
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "bench: the pull did not complete: $status" >&2; exit 1; fi
  sleep 0.02
done
pull_ms=$(ms_since "$t0")
wait "$setup_pid"
local_count=$({ grep -rhoa '"msg_h[0-9]*"' "$bench_work/m2/conversations" || true; } | sort -u | wc -l)
echo "setup to pulled $HISTORY: $(seconds_of "$pull_ms") s ($(jq -c '{state, pulled, pending}' <<<"$status"); $local_count distinct message ids in the local files)"
read -r pull1_s pull1_n < <(cloud_route_seconds /api/maestra/sync/pull)
awk -v n="$((pull1_n - pull0_n))" -v t="$(awk -v a="$pull0_s" -v b="$pull1_s" 'BEGIN { print b - a }')" -v total="$pull_ms" \
  'BEGIN { printf "  of which in the cloud'"'"'s pull handler: %d requests (the key check included), %.0f ms (%.0f%%); the rest is the local side (HTTP, JSON, the store)\n", n, t * 1000, 100 * t * 1000 / total }'
t0=$(now_ms)
psql -Xq "$cloud_db" -o /dev/null <<'SQL'
BEGIN;
SELECT m.feed_seq, c.id AS conversation_id, m.id, m.role, m.surface_id, m.content, m.created_at,
       m.model, m.prompt_tokens, m.completion_tokens, m.cost_usd, m.origin
FROM messages m JOIN conversations c ON c.pk = m.conversation_pk JOIN owners o ON o.id = m.owner_id
WHERE o.tenant_id = 'default' AND o.user_id = 'hist' ORDER BY m.feed_seq;
COMMIT;
SQL
read_ms=$(ms_since "$t0")
echo "baseline: psql reading the same $HISTORY rows in one transaction: $read_ms ms; pull / baseline $(ratio "$pull_ms" "$read_ms")x"
stop_server "$m2_pid"
forget_pid "$m2_pid"

# --- 3. a sync round with nothing to do, on the wire -------------------------------------------
echo
echo "== 3. a sync round with nothing to do"
# A TCP forwarder that keeps every byte it passes: client -> cloud in up.bin, back in down.bin,
# each written before it is passed on; one byte in conns.bin per connection accepted.
mkdir -p "$bench_work/wire"
python3 - "$cloud_port" "$bench_work/wire" <<'PY' &
import os, socket, sys, threading
target, folder = int(sys.argv[1]), sys.argv[2]
files = {name: open(os.path.join(folder, name), "ab", buffering=0) for name in ("up.bin", "down.bin", "conns.bin")}
lock = threading.Lock()
def pipe(src, dst, name):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            with lock:
                files[name].write(data)
            dst.sendall(data)
    except OSError:
        pass
    for s in (dst, src):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 0))
server.listen(64)
with open(os.path.join(folder, "port.tmp"), "w") as f:
    f.write(f"{server.getsockname()[1]}\n")
os.rename(os.path.join(folder, "port.tmp"), os.path.join(folder, "port"))
while True:
    client, _ = server.accept()
    upstream = socket.create_connection(("127.0.0.1", target))
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with lock:
        files["conns.bin"].write(b".")
    threading.Thread(target=pipe, args=(client, upstream, "up.bin"), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client, "down.bin"), daemon=True).start()
PY
bench_pids+=($!)
for _ in $(seq 100); do [ -s "$bench_work/wire/port" ] && break; sleep 0.1; done
forwarder="http://127.0.0.1:$(cat "$bench_work/wire/port")"

wire_mark() { stat -c %s "$bench_work/wire/up.bin" "$bench_work/wire/down.bin" "$bench_work/wire/conns.bin" | paste -sd' '; }
# Marks once nothing has gone through for half a second (a round still under way, e.g. one the
# last writes started, is not counted in the next one).
wire_quiet_mark() {
  local mark next
  mark=$(wire_mark)
  while sleep 0.5; next=$(wire_mark); [ "$next" != "$mark" ]; do mark=$next; done
  echo "$mark"
}
# wire_since "UP DOWN CONNS": requests, bytes up, bytes down, connections since that mark, and
# each request and answer split into head and body.
wire_since() {
  python3 - "$bench_work/wire" "$1" <<'PY'
import re, sys
folder, (up0, down0, conns0) = sys.argv[1], map(int, sys.argv[2].split())
up = open(f"{folder}/up.bin", "rb").read()[up0:]
down = open(f"{folder}/down.bin", "rb").read()[down0:]
conns = len(open(f"{folder}/conns.bin", "rb").read()) - conns0
def split(data):
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            out.append((data.split(b"\r\n")[0].decode(errors="replace"), len(data), 0))
            break
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        body = int(m.group(1)) if m else 0
        lines = head.decode(errors="replace").split("\r\n")
        names = ", ".join(l.split(":")[0].lower() for l in lines[1:])
        out.append((f"{lines[0]}: [{names}]", len(head) + 4, body))
        data = rest[body:]
    return out
requests, answers = split(up), split(down)
if len(answers) != len(requests):
    print(f"bench: {len(requests)} requests but {len(answers)} answers in the window", file=sys.stderr)
print(f"{len(requests)} {len(up)} {len(down)} {conns}")
for (line, head, body) in requests + answers:
    print(f"  {line}: head {head} B, body {body} B")
PY
}
start_local m3 MAESTRA_SYNC_INTERVAL=3600
m3=$server_url
m3_pid=$server_pid
sync_setup m3 "$forwarder" idle
user_bodies idle conv_idle 4 >"$bench_work/idle.jsonl"
oha --no-tui -n 10 -c 1 -m POST -H 'Content-Type: application/json' -Z "$bench_work/idle.jsonl" \
  "$m3/api/maestra/core" >/dev/null
until_synced "$m3" >/dev/null
sync_now "$m3" >/dev/null
idle_rows=()
for label in "right after another round" "again" "after 6 s idle (past the cloud's 5 s keep-alive)"; do
  case $label in after*) sleep 6 ;; esac
  mark=$(wire_quiet_mark)
  status=$(sync_now "$m3")
  sleep 0.1 # the forwarder sees the closing of a connection after the answer
  report=$(wire_since "$mark")
  read -r n up down conns <<<"$(head -1 <<<"$report")"
  echo "sync now, $label: $n request(s), $up B up + $down B down = $((up + down)) B, $conns new connection(s); state $(jq -r .state <<<"$status")"
  tail -n +2 <<<"$report"
  idle_rows+=("$n $((up + down)) $conns")
done
mark=$(wire_quiet_mark)
curl -fs -o /dev/null "$forwarder/health/live"
sleep 0.1
report=$(wire_since "$mark")
read -r base_n base_up base_down _ <<<"$(head -1 <<<"$report")"
echo "baseline: curl GET /health/live through the forwarder: $base_n request, $base_up B up + $base_down B down = $((base_up + base_down)) B"
read -r idle_n idle_bytes _ <<<"${idle_rows[0]}"
read -r cold_n cold_bytes cold_conns <<<"${idle_rows[2]}"
echo "round with nothing to do / baseline: $(ratio "$idle_bytes" $((base_up + base_down)))x the bytes (TCP/IP framing not counted: about 52 B per segment on loopback)"
stop_server "$m3_pid"
forget_pid "$m3_pid"
# What an idle install sends at the default interval (MAESTRA_SYNC_INTERVAL, 5 s).
start_local m3b
m3b_pid=$server_pid
sync_setup m3b "$forwarder" idle
until_synced "$server_url" >/dev/null
sleep 1
mark=$(wire_mark)
sleep "${IDLE_SECONDS:-30}"
report=$(wire_since "$mark")
read -r periodic_n periodic_up periodic_down periodic_conns <<<"$(head -1 <<<"$report")"
echo "idle at the default interval for ${IDLE_SECONDS:-30} s: $periodic_n requests, $((periodic_up + periodic_down)) B ($(ratio $((periodic_up + periodic_down)) "$periodic_n") B per round), $periodic_conns new connections"
stop_server "$m3b_pid"
forget_pid "$m3b_pid"

# --- 4. a local turn with sync on vs off --------------------------------------------------------
echo
echo "== 4. local turns with sync on vs off, $RATE req/s, $ROUNDS alternating rounds"
start_local on
on_url=$server_url
on_pid=$server_pid
sync_setup on "$cloud_url" turns
start_local off MAESTRA_SYNC=off
off_url=$server_url
off_pid=$server_pid
sync_setup off "$cloud_url" turns
echo "sync: on $(sync_status "$on_url" | jq -c '{state, pending}'), off $(sync_status "$off_url" | jq -c '{state}')"
user_bodies turns conv_turns 64 >"$bench_work/turns.jsonl"
load() { # name, url, oha arguments...
  oha_run "$1" "${@:3}" -m POST -H 'Content-Type: application/json' -Z "$bench_work/turns.jsonl" \
    "$2/api/maestra/core"
}
# drain: after a run with sync on, until the cloud has it all; prints the records the cloud
# was missing at the end of the run (every turn is 2) and how long they took, in ms.
drain() {
  local held t0
  held=$(cloud_count turns)
  t0=$(now_ms)
  until_synced "$on_url" 600 >/dev/null
  echo "$(($(cloud_count turns) - held)) $(ms_since "$t0")"
}
for target in "$on_url" "$off_url"; do
  oha --no-tui -z 2s -q "$RATE" -c 16 -m POST -H 'Content-Type: application/json' \
    -Z "$bench_work/turns.jsonl" "$target/api/maestra/core" >/dev/null
done
drain >/dev/null
printf 'scenario\treq/s\tp50 ms\tp99 ms\terrors\tlocal CPU s\n'
pairs=()
off_rows=()
for round in $(seq "$ROUNDS"); do
  order=(on off)
  if [ $((round % 2)) = 0 ]; then order=(off on); fi
  for side in "${order[@]}"; do
    if [ "$side" = on ]; then url=$on_url pid=$on_pid; else url=$off_url pid=$off_pid; fi
    c0=$(cpu_seconds "$pid"); k0=$(cpu_seconds "$cloud_pid"); p0=$(postgres_cpu_seconds)
    row=$(load "sync $side@${RATE}/s #$round" "$url" -q "$RATE" -c 16 --latency-correction)
    c1=$(cpu_seconds "$pid"); k1=$(cpu_seconds "$cloud_pid"); p1=$(postgres_cpu_seconds)
    cpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')
    printf '%s\t%s\n' "$row" "$cpu"
    if [ "$side" = on ]; then
      on_row=$row on_cpu=$cpu
      read -r left drained <<<"$(drain)"
      echo "  the cloud was missing $left records at the end of the run; they arrived in $(seconds_of "$drained") s; cloud CPU during the run: maestra $(awk -v a="$k0" -v b="$k1" 'BEGIN { printf "%.2f", b - a }') s, postgres (all) $(awk -v a="$p0" -v b="$p1" 'BEGIN { printf "%.2f", b - a }') s"
    else
      off_row=$row off_cpu=$cpu
      off_rows+=("$(col 3 "$row") $(col 4 "$row")")
    fi
  done
  pairs+=("$(ratio "$(col 3 "$on_row")" "$(col 3 "$off_row")") $(ratio "$(col 4 "$on_row")" "$(col 4 "$off_row")") $(ratio "$(col 2 "$on_row")" "$(col 2 "$off_row")") $(ratio "$on_cpu" "$off_cpu")")
done
median_of() { # field number in pairs
  printf '%s\n' "${pairs[@]}" | awk -v f="$1" '{ print $f }' | sort -g | sed -n "$(((ROUNDS + 1) / 2))p"
}
echo "on / off by round (p50 p99 req/s local-CPU): $(printf '%s, ' "${pairs[@]}" | sed 's/, $//')"
turn_p50=$(median_of 1)
turn_p99=$(median_of 2)
turn_cpu=$(median_of 4)
echo "median on / off: p50 ${turn_p50}x, p99 ${turn_p99}x, local server CPU ${turn_cpu}x"
printf '%s\n' "${off_rows[@]}" | awk '
  NR == 1 { a = b = $1; c = d = $2 }
  { if ($1 < a) a = $1; if ($1 > b) b = $1; if ($2 < c) c = $2; if ($2 > d) d = $2 }
  END { printf "the weather: sync off alone ranged p50 %s-%s ms, p99 %s-%s ms over its rounds (%.2fx, %.2fx)\n", a, b, c, d, b / a, d / c }'
# The same weather for both: the two servers loaded at once, each at RATE, ROUNDS / 2 + 1 times
# (the co-located cloud's work then slows both alike, as it would not on a real deployment).
together=()
for round in $(seq $((ROUNDS / 2 + 1))); do
  c0=$(cpu_seconds "$on_pid"); d0=$(cpu_seconds "$off_pid")
  load "sync on, both at once #$round" "$on_url" -q "$RATE" -c 16 --latency-correction >"$bench_work/together_on" &
  on_load=$!
  load "sync off, both at once #$round" "$off_url" -q "$RATE" -c 16 --latency-correction >"$bench_work/together_off" &
  off_load=$!
  wait "$on_load" "$off_load"
  on_row=$(cat "$bench_work/together_on"); off_row=$(cat "$bench_work/together_off")
  on_cpu=$(awk -v a="$c0" -v b="$(cpu_seconds "$on_pid")" 'BEGIN { printf "%.2f", b - a }')
  off_cpu=$(awk -v a="$d0" -v b="$(cpu_seconds "$off_pid")" 'BEGIN { printf "%.2f", b - a }')
  printf '%s\t%s\n%s\t%s\n' "$on_row" "$on_cpu" "$off_row" "$off_cpu"
  together+=("$(ratio "$(col 3 "$on_row")" "$(col 3 "$off_row")") $(ratio "$(col 4 "$on_row")" "$(col 4 "$off_row")") $(ratio "$(col 2 "$on_row")" "$(col 2 "$off_row")") $(ratio "$on_cpu" "$off_cpu")")
  drain >/dev/null
done
echo "both at once, on / off by round (p50 p99 req/s local-CPU): $(printf '%s, ' "${together[@]}" | sed 's/, $//')"
together_median() { # field number
  printf '%s\n' "${together[@]}" | awk -v f="$1" '{ print $f }' | sort -g | sed -n "$(((${#together[@]} + 1) / 2))p"
}
echo "both at once, median on / off: p50 $(together_median 1)x, p99 $(together_median 2)x, local server CPU $(together_median 4)x"

# Where a longer tail comes from: the same alternating pairs with a third server linked to a
# stub cloud (python; answers every push and pull at once and stores nothing). The local side of
# sync does all its work (scans, JSON, HTTP, the state file) and no cloud, no Postgres takes CPU.
python3 - "$bench_work/stub.port" <<'PY' &
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.endswith("/push"):
            n = len(body.get("records", []))
            answer = {"accepted": n, "added": n, "duplicates": 0, "dropped": 0}
        else:
            answer = {"records": [], "cursors": body.get("cursors", {}), "more": False}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{server.server_address[1]}\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
server.serve_forever()
PY
stub_pid=$!
bench_pids+=("$stub_pid")
for _ in $(seq 100); do [ -s "$bench_work/stub.port" ] && break; sleep 0.1; done
start_local stub
stub_url=$server_url
stub_local_pid=$server_pid
sync_setup stub "http://127.0.0.1:$(cat "$bench_work/stub.port")" turns
oha --no-tui -z 2s -q "$RATE" -c 16 -m POST -H 'Content-Type: application/json' \
  -Z "$bench_work/turns.jsonl" "$stub_url/api/maestra/core" >/dev/null
until_synced "$stub_url" >/dev/null
stubbed=()
for round in $(seq $((ROUNDS / 2 + 1))); do
  order=(stub off)
  if [ $((round % 2)) = 0 ]; then order=(off stub); fi
  for side in "${order[@]}"; do
    if [ "$side" = stub ]; then url=$stub_url pid=$stub_local_pid; else url=$off_url pid=$off_pid; fi
    c0=$(cpu_seconds "$pid"); s0=$(cpu_seconds "$stub_pid")
    name="sync on, stub cloud"
    if [ "$side" = off ]; then name="sync off"; fi
    row=$(load "$name@${RATE}/s #$round, stub pairs" "$url" -q "$RATE" -c 16 --latency-correction)
    cpu=$(awk -v a="$c0" -v b="$(cpu_seconds "$pid")" 'BEGIN { printf "%.2f", b - a }')
    printf '%s\t%s\n' "$row" "$cpu"
    if [ "$side" = stub ]; then
      stub_row=$row stub_cpu=$cpu
      until_synced "$stub_url" >/dev/null
      echo "  the stub cloud's CPU during the run: $(awk -v a="$s0" -v b="$(cpu_seconds "$stub_pid")" 'BEGIN { printf "%.2f", b - a }') s"
    else
      off_row=$row off_cpu=$cpu
    fi
  done
  stubbed+=("$(ratio "$(col 3 "$stub_row")" "$(col 3 "$off_row")") $(ratio "$(col 4 "$stub_row")" "$(col 4 "$off_row")") $(ratio "$(col 2 "$stub_row")" "$(col 2 "$off_row")") $(ratio "$stub_cpu" "$off_cpu")")
done
echo "stub cloud, on / off by round (p50 p99 req/s local-CPU): $(printf '%s, ' "${stubbed[@]}" | sed 's/, $//')"
stub_median() { # field number
  printf '%s\n' "${stubbed[@]}" | awk -v f="$1" '{ print $f }' | sort -g | sed -n "$(((${#stubbed[@]} + 1) / 2))p"
}
echo "stub cloud, median on / off: p50 $(stub_median 1)x, p99 $(stub_median 2)x, local server CPU $(stub_median 4)x"
stop_server "$stub_local_pid"
forget_pid "$stub_local_pid"

# Flushes per turn on each server, counted by strace (every thread, those started later too);
# a run of its own, since strace slows the server down.
if command -v strace >/dev/null; then
  for side in on off; do
    if [ "$side" = on ]; then url=$on_url pid=$on_pid; else url=$off_url pid=$off_pid; fi
    strace -f -c -e trace=fsync,fdatasync -p "$pid" -o "$bench_work/strace_$side.txt" 2>/dev/null &
    strace_pid=$!
    sleep 0.5
    turns=$((RATE * 4))
    oha --no-tui -n "$turns" -q "$RATE" -c 16 -m POST -H 'Content-Type: application/json' \
      -Z "$bench_work/turns.jsonl" "$url/api/maestra/core" >/dev/null
    if [ "$side" = on ]; then sleep 0.5; fi # the last pushes
    kill -INT "$strace_pid"
    wait "$strace_pid" || true
    awk -v side="$side" -v n="$turns" '$NF == "fdatasync" { d = $4 } $NF == "fsync" { f = $4 }
      END { printf "flushes with sync %s (strace, %d turns at the rate): %.2f fdatasync + %.3f fsync per turn\n", side, n, d / n, f / n }' \
      "$bench_work/strace_$side.txt"
    if [ "$side" = on ]; then drain >/dev/null; fi
  done
fi

# saturated SIDE URL PID: one run at CONNECTIONS; prints its row, then where the CPU went.
saturated() {
  local c0 k0 p0 a0 row
  c0=$(cpu_seconds "$3"); k0=$(cpu_seconds "$cloud_pid"); p0=$(postgres_cpu_seconds); a0=$(machine_busy_seconds)
  row=$(load "sync $1@${CONNECTIONS}c" "$2" -c "$CONNECTIONS")
  echo "$row"
  awk -v c0="$c0" -v c1="$(cpu_seconds "$3")" -v k0="$k0" -v k1="$(cpu_seconds "$cloud_pid")" \
    -v p0="$p0" -v p1="$(postgres_cpu_seconds)" -v a0="$a0" -v a1="$(machine_busy_seconds)" \
    -v n="$(jq '[.statusCodeDistribution[]] | add // 0' "$bench_work/sync_${1}_${CONNECTIONS}c.json")" 'BEGIN {
    printf "  CPU during the run: machine %.1f s busy; this local server %.1f s (%.0f us per turn); cloud maestra %.1f s; postgres (all) %.1f s; rest (oha, others) %.1f s\n",
      a1 - a0, c1 - c0, 1e6 * (c1 - c0) / n, k1 - k0, p1 - p0, (a1 - a0) - (c1 - c0) - (k1 - k0) - (p1 - p0) }'
}
saturated off "$off_url" "$off_pid" >"$bench_work/off_sat.txt"
cat "$bench_work/off_sat.txt"
saturated on "$on_url" "$on_pid" >"$bench_work/on_sat.txt"
cat "$bench_work/on_sat.txt"
off_sat=$(head -1 "$bench_work/off_sat.txt")
on_sat=$(head -1 "$bench_work/on_sat.txt")
read -r left drained <<<"$(drain)"
echo "  the cloud was missing $left records at the end of the run; they arrived in $(seconds_of "$drained") s ($(awk -v n="$left" -v ms="$drained" 'BEGIN { printf "%.0f", n / (ms / 1000) }') records/s)"
turn_rps=$(ratio "$(col 2 "$on_sat")" "$(col 2 "$off_sat")")
echo "saturation throughput on / off: ${turn_rps}x; p99 $(ratio "$(col 4 "$on_sat")" "$(col 4 "$off_sat")")x"
grep -hm3 -E '"level":"(WARN|ERROR)"' "$bench_work"/{cloud,m1,m2,m3,on,off}.log 2>/dev/null | cut -c1-300 || true

echo
echo "summary: converge $(seconds_of "$converge_ms") s (target 5; psql floor $floor_ms ms); pull $HISTORY $(seconds_of "$pull_ms") s (target 10; psql $read_ms ms); idle round $idle_n request(s), $idle_bytes B ($cold_n / $cold_bytes B / $cold_conns connection(s) after idle); turn on/off p50 ${turn_p50}x p99 ${turn_p99}x CPU ${turn_cpu}x, saturation ${turn_rps}x"
bench_result sync_converge_ms "$converge_ms"
bench_result sync_converge_alone_ms "$alone_ms"
bench_result sync_converge_floor_ms "$floor_ms"
bench_result sync_pull_ms "$pull_ms"
bench_result sync_pull_floor_ms "$read_ms"
bench_result sync_idle_requests "$idle_n"
bench_result sync_idle_bytes "$idle_bytes"
bench_result sync_idle_cold_bytes "$cold_bytes"
bench_result sync_idle_floor_bytes "$((base_up + base_down))"
bench_result sync_turn_p50 "$turn_p50"
bench_result sync_turn_p99 "$turn_p99"
bench_result sync_turn_rps "$turn_rps"
bench_result sync_turn_cpu "$turn_cpu"
bench_result sync_together_p50 "$(together_median 1)"
bench_result sync_together_p99 "$(together_median 2)"
bench_result sync_stub_p50 "$(stub_median 1)"
bench_result sync_stub_p99 "$(stub_median 2)"
