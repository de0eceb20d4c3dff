#!/usr/bin/env bash
# The database floor for cloud mode: one core request's database work as pgbench sees it, with
# the server's own statements, in the server's order, each its own transaction as the server
# runs them: append the user's message (durable before the model is called), read the last 20
# messages, append the reply with its usage row (durable before the response); prepared, as sqlx
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

# 3 tenants (one user each) x 64 conversations of its own, as bench/cloud.sh's 3 keys.
psql -q "$url" <<'SQL'
INSERT INTO tenants (id) SELECT 'pgbench' || t FROM generate_series(1, 3) AS t ON CONFLICT DO NOTHING;
SQL

# src/store/postgres.rs: append, recent, append (with usage) — three transactions.
append() { # role, content, model, prompt tokens, completion tokens, cost, with usage
  cat <<SQL
WITH owner AS (
    INSERT INTO owners AS o (tenant_id, user_id, feed_head) VALUES ('pgbench' || :t, 'bench', 1)
    ON CONFLICT (tenant_id, user_id) DO UPDATE SET feed_head = o.feed_head + 1
    RETURNING id, feed_head
), conversation AS (
    INSERT INTO conversations AS c (tenant_id, id, user_id, owner_id, last_seq, last_created_at)
    SELECT 'pgbench' || :t, 'conv_pg_' || :c, 'bench', owner.id, 1, GREATEST(now(),
        (SELECT d.deleted_at + interval '1 microsecond' FROM conversation_deletions d
         WHERE d.owner_id = owner.id AND d.conversation_id = 'conv_pg_' || :c))
    FROM owner
    ON CONFLICT (tenant_id, user_id, id) DO UPDATE
        SET last_seq = c.last_seq + 1, updated_at = now(),
            last_created_at = GREATEST(EXCLUDED.last_created_at, c.last_created_at + interval '1 microsecond')
    RETURNING pk, last_seq, last_created_at
), message AS (
    INSERT INTO messages (conversation_pk, seq, id, role, surface_id, content, created_at, model, prompt_tokens, completion_tokens, cost_usd, api_key_id, owner_id, feed_seq)
    SELECT conversation.pk, conversation.last_seq, 'msg_' || md5(random()::text), '$1', 'cli', '$2', conversation.last_created_at, $3, $4, $5, $6, 'pgbenchkey', owner.id, owner.feed_head
    FROM conversation, owner
    RETURNING seq, created_at
), usage_row AS (
    INSERT INTO usage (ts, tenant_id, api_key_id, user_id, conversation_id, surface_id, model, prompt_tokens, completion_tokens, cost_usd)
    SELECT message.created_at, 'pgbench' || :t, 'pgbenchkey', 'bench', 'conv_pg_' || :c, 'cli', $3, $4, $5, $6 FROM message WHERE $7
) SELECT seq, created_at FROM message;
SQL
}
{
  echo '\set t random(1, 3)'
  echo '\set c random(1, 64)'
  append user 'Hello, how is the project going?' NULL NULL NULL NULL false
  cat <<'SQL'
SELECT m.id, m.seq, m.role, m.surface_id, m.content, m.created_at, m.model, m.prompt_tokens, m.completion_tokens, m.cost_usd, m.origin
FROM messages m JOIN conversations c ON c.pk = m.conversation_pk
WHERE c.tenant_id = 'pgbench' || :t AND c.id = 'conv_pg_' || :c AND c.user_id = 'bench' ORDER BY m.seq DESC LIMIT 20;
SQL
  append assistant 'A reply of ordinary length for the benchmark.' "'offline'" 12 9 0 true
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
echo "pgbench core-turn baseline: $(date -u +%FT%TZ), $CLIENTS clients, ${seconds} s: $tps TPS, p50 $p50 ms, p99 $p99 ms, ${failed:-0} failed; per turn: $(awk -v w="$wal" -v t="$turns" 'BEGIN { printf "%.0f", w / t }') WAL bytes, 3 statements"
bench_result pgbench_tps "$tps"
bench_result pgbench_p50 "$p50"
bench_result pgbench_p99 "$p99"
bench_result pgbench_failed "${failed:-0}"
