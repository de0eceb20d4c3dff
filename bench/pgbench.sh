#!/usr/bin/env bash
# The database floor for cloud mode: one core request's database work as pgbench sees it, with
# the server's own statements, in the server's order, each its own transaction as the server
# runs them: append the user's message and read the 19 before it (one statement; durable before
# the model is called), append the reply with its usage row (durable before the response); prepared, as sqlx
# prepares them. 3 tenants x 64 conversations, as bench/cloud.sh. On the same Postgres, schema
# and machine; prints TPS, p50, p99 and WAL bytes per turn.
#   bench/pgbench.sh                        # a fresh database, 10 s, 32 clients
#   DURATION=10s CLIENTS=32 PGBENCH_DATABASE_URL=postgres://… bench/pgbench.sh
#                                           # an existing migrated database (bench/cloud.sh)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup
bench_need pgbench psql

CLIENTS=${CLIENTS:-$CONNECTIONS}
seconds=${DURATION%s}
if [ -n "${PGBENCH_DATABASE_URL:-}" ]; then
  url=$PGBENCH_DATABASE_URL
else
  bench_database maestra_pgbench
  url=$db_url
fi

# 3 tenants (one user each) x 64 conversations of its own, as bench/cloud.sh's 3 keys, each
# with its first message: the turns below go to conversations that exist, as the server's do
# after their first (which takes a second statement to create the conversation).
psql -q "$url" <<'SQL'
INSERT INTO tenants (id) SELECT 'pgbench' || t FROM generate_series(1, 3) AS t ON CONFLICT DO NOTHING;
INSERT INTO owners (tenant_id, user_id) SELECT 'pgbench' || t, 'bench' FROM generate_series(1, 3) AS t
  ON CONFLICT DO NOTHING;
INSERT INTO conversations (tenant_id, id, user_id, owner_id, last_seq, last_created_at)
  SELECT o.tenant_id, 'conv_pg_' || c, 'bench', o.id, 1, now()
  FROM owners o, generate_series(1, 64) AS c WHERE o.tenant_id LIKE 'pgbench%'
  ON CONFLICT DO NOTHING;
INSERT INTO messages (conversation_pk, seq, id, role, surface_id, content, created_at, owner_id)
  SELECT pk, 1, 'msg_' || md5(random()::text), 'user', 'cli', 'Hello', now(), owner_id
  FROM conversations WHERE tenant_id LIKE 'pgbench%' AND last_seq = 1
  ON CONFLICT DO NOTHING;
SQL

# src/store/postgres.rs: the question with its history, then the reply (with usage) — two
# transactions.
conversation="WITH conversation AS (
    UPDATE conversations c
    SET last_seq = c.last_seq + 1, updated_at = now(),
        last_created_at = GREATEST(now(), c.last_created_at + interval '1 microsecond')
    WHERE c.tenant_id = 'pgbench' || :t AND c.id = 'conv_pg_' || :c AND c.user_id = 'bench'
    RETURNING pk, owner_id, last_seq, last_created_at
)"
message() { # role, content, model, prompt tokens, completion tokens, cost, with usage
  cat <<SQL
, message AS (
    INSERT INTO messages (conversation_pk, seq, id, role, surface_id, content, created_at, model, prompt_tokens, completion_tokens, cost_usd, api_key_id, owner_id)
    SELECT pk, last_seq, 'msg_' || md5(random()::text), '$1', 'cli', '$2', last_created_at, $3, $4, $5, $6, 'pgbenchkey', owner_id
    FROM conversation
    RETURNING seq, created_at
), usage_row AS (
    INSERT INTO usage (ts, tenant_id, api_key_id, user_id, conversation_id, surface_id, model, prompt_tokens, completion_tokens, cost_usd)
    SELECT message.created_at, 'pgbench' || :t, 'pgbenchkey', 'bench', 'conv_pg_' || :c, 'cli', $3, $4, $5, $6 FROM message WHERE $7
)
SQL
}
{
  echo '\set t random(1, 3)'
  echo '\set c random(1, 64)'
  echo "$conversation"
  message user 'Hello, how is the project going?' NULL NULL NULL NULL false
  cat <<'SQL'
SELECT * FROM (
    SELECT 0 AS part, NULL::text AS id, seq, NULL::text AS role, NULL::text AS surface_id, NULL::text AS content, created_at, NULL::text AS model, NULL::bigint AS prompt_tokens, NULL::bigint AS completion_tokens, NULL::float8 AS cost_usd, NULL::text AS origin FROM message
    UNION ALL
    (SELECT 1, m.id, m.seq, m.role, m.surface_id, m.content, m.created_at, m.model, m.prompt_tokens, m.completion_tokens, m.cost_usd, m.origin
     FROM messages m WHERE m.conversation_pk = (SELECT pk FROM conversation) ORDER BY m.seq DESC LIMIT 19)
) rows ORDER BY part, seq DESC;
SQL
  echo "$conversation"
  message assistant 'A reply of ordinary length for the benchmark.' "'offline'" 12 9 0 true
  echo 'SELECT seq, created_at FROM message;'
} >"$bench_work/turn.sql"

lsn0=$(wal_lsn "$url")
(cd "$bench_work" && pgbench -n -M prepared -f turn.sql -c "$CLIENTS" -j 2 -T "$seconds" -l "$url" \
  >pgbench.out 2>&1) || { cat "$bench_work/pgbench.out" >&2; exit 1; }
lsn1=$(wal_lsn "$url")
tps=$(awk '/^tps/ { print int($3) }' "$bench_work/pgbench.out")
turns=$(awk '/number of transactions actually processed/ { print $6 + 0 }' "$bench_work/pgbench.out")
read -r wal _ < <(wal_bytes "$url" "$lsn0" "$lsn1")
failed=$(awk '/number of failed transactions/ { print $5 + 0 }' "$bench_work/pgbench.out")
# Per-transaction log: the third field is the latency in microseconds.
read -r p50 p99 < <(cat "$bench_work"/pgbench_log.* | awk '{ print $3 }' | sort -n |
  awk '{ a[NR] = $1 } END { printf "%.3f %.3f\n", a[int(NR * 0.5)] / 1000, a[int(NR * 0.99)] / 1000 }')
echo "pgbench core-turn baseline: $(date -u +%FT%TZ), $CLIENTS clients, ${seconds} s: $tps TPS, p50 $p50 ms, p99 $p99 ms, ${failed:-0} failed; per turn: $(awk -v w="$wal" -v t="$turns" 'BEGIN { printf "%.0f", w / t }') WAL bytes, 2 statements"
bench_result pgbench_tps "$tps"
bench_result pgbench_p50 "$p50"
bench_result pgbench_p99 "$p99"
bench_result pgbench_failed "${failed:-0}"
