#!/usr/bin/env bash
# The lean model of a core turn (issue 17): the same contract in as little SQL as it takes, on a
# schema with just two primary keys, in a database of its own. Per turn: the user's message in
# one transaction (bump the conversation's last_seq, insert the message), the last 20 messages,
# the reply in a second transaction; each message durable (committed) before the next step, as
# the server promises. Bigint ids, no owners, no feed, no usage row: what the server's SQL is
# measured against (bench/cloud.sh prints the ratios). Conversations: 3 x 64, as in
# bench/cloud.sh. Prints TPS (turns/s), p50, p99, and WAL bytes and transactions per turn.
#   bench/lean.sh                           # 10 s, 32 clients
#   DURATION=10s CLIENTS=32 bench/lean.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
# Postgres only: no build, no oha.
bench_need pgbench psql
bench_work=$(mktemp -d -p "${BENCH_DIR:-$BENCH_ROOT}" maestra-bench.XXXXXX)

CLIENTS=${CLIENTS:-$CONNECTIONS}
CONVERSATIONS=${CONVERSATIONS:-192}
seconds=${DURATION%s}
db="maestra_lean_$$"
psql -q "$ADMIN_URL" -c "CREATE DATABASE $db" >/dev/null
bench_dbs+=("$db")
url="${ADMIN_URL%/*}/$db"

psql -q "$url" -v n="$CONVERSATIONS" <<'SQL'
CREATE TABLE conversations (
    id        BIGINT PRIMARY KEY,
    last_seq  BIGINT NOT NULL
);
CREATE TABLE messages (
    conversation_id    BIGINT NOT NULL,
    seq                BIGINT NOT NULL,
    role               TEXT NOT NULL,
    surface_id         TEXT NOT NULL,
    content            TEXT NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    model              TEXT,
    prompt_tokens      BIGINT,
    completion_tokens  BIGINT,
    cost_usd           DOUBLE PRECISION,
    PRIMARY KEY (conversation_id, seq)
);
INSERT INTO conversations SELECT g, 1 FROM generate_series(1, :n) AS g;
INSERT INTO messages (conversation_id, seq, role, surface_id, content)
  SELECT g, 1, 'user', 'cli', 'Hello' FROM generate_series(1, :n) AS g;
VACUUM ANALYZE;
SQL

cat >"$bench_work/lean.sql" <<SQL
\\set c random(1, $CONVERSATIONS)
BEGIN;
UPDATE conversations SET last_seq = last_seq + 1 WHERE id = :c RETURNING last_seq AS seq \\gset
INSERT INTO messages (conversation_id, seq, role, surface_id, content)
  VALUES (:c, :seq, 'user', 'cli', 'Hello, how is the project going?');
COMMIT;
SELECT seq, role, surface_id, content, created_at, model, prompt_tokens, completion_tokens, cost_usd
  FROM messages WHERE conversation_id = :c ORDER BY seq DESC LIMIT 20;
BEGIN;
UPDATE conversations SET last_seq = last_seq + 1 WHERE id = :c RETURNING last_seq AS seq \\gset
INSERT INTO messages (conversation_id, seq, role, surface_id, content, model, prompt_tokens,
    completion_tokens, cost_usd)
  VALUES (:c, :seq, 'assistant', 'cli', 'A reply of ordinary length for the benchmark.', 'offline', 12, 9, 0);
COMMIT;
SQL

lsn0=$(wal_lsn "$url")
read -r x0 _ <<<"$(db_counters "$url")"
(cd "$bench_work" && pgbench -n -M prepared -f lean.sql -c "$CLIENTS" -j 2 -T "$seconds" -l \
  --log-prefix=turnlog "$url" >lean.out 2>&1) || { cat "$bench_work/lean.out" >&2; exit 1; }
lsn1=$(wal_lsn "$url")
read -r x1 _ <<<"$(db_counters "$url")"
tps=$(awk '/^tps/ { print int($3) }' "$bench_work/lean.out")
failed=$(awk '/number of failed transactions/ { print $5 + 0 }' "$bench_work/lean.out")
turns=$(awk '/number of transactions actually processed/ { print $6 + 0 }' "$bench_work/lean.out")
read -r p50 p99 < <(cat "$bench_work"/turnlog.* | awk '{ print $3 }' | sort -n |
  awk '{ a[NR] = $1 } END { printf "%.3f %.3f\n", a[int(NR * 0.5)] / 1000, a[int(NR * 0.99)] / 1000 }')
read -r wal xacts < <(wal_bytes "$url" "$lsn0" "$lsn1")
echo "lean model: $(date -u +%FT%TZ), $CLIENTS clients, ${seconds} s: $tps TPS, p50 $p50 ms, p99 $p99 ms, ${failed:-0} failed;" \
  "per turn: $(awk -v w="$wal" -v t="$turns" 'BEGIN { printf "%.0f", w / t }') WAL bytes," \
  "$(awk -v w="$xacts" -v t="$turns" 'BEGIN { printf "%.2f", w / t }') writing transactions," \
  "$(awk -v a="$x0" -v b="$x1" -v t="$turns" 'BEGIN { printf "%.2f", (b - a) / t }') commits, 5 statements"
bench_result lean_tps "$tps"
bench_result lean_p50 "$p50"
bench_result lean_p99 "$p99"
bench_result lean_failed "${failed:-0}"
