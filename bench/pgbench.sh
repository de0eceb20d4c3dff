#!/usr/bin/env bash
# The database floor for cloud mode: one core request's database work as pgbench sees it, with
# the server's own statements, in the server's order, each its own transaction as the server
# runs them: append the user's message (durable before the model is called), read the last 20
# messages, append the reply with its usage row (durable before the response). On the same
# Postgres, schema and machine; prints TPS, p50 and p99.
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

# 64 conversations of its own, as in the HTTP benchmarks' spread.
psql -q "$url" <<'SQL'
INSERT INTO tenants (id) VALUES ('pgbench') ON CONFLICT DO NOTHING;
INSERT INTO conversations (id, tenant_id, user_id, last_seq)
  SELECT 'conv_pg_' || g, 'pgbench', 'bench', 1 FROM generate_series(1, 64) AS g
  ON CONFLICT DO NOTHING;
INSERT INTO messages (conversation_id, seq, id, role, surface_id, content)
  SELECT 'conv_pg_' || g, 1, 'msg_pg_first_' || g, 'user', 'cli', 'Hello'
  FROM generate_series(1, 64) AS g ON CONFLICT DO NOTHING;
SQL

# src/store/postgres.rs: append, recent, append (with usage) — three transactions.
cat >"$bench_work/turn.sql" <<'SQL'
\set c random(1, 64)
WITH conversation AS (
    INSERT INTO conversations AS c (tenant_id, id, user_id, last_seq) VALUES ('pgbench', 'conv_pg_' || :c, 'bench', 1)
    ON CONFLICT (id) DO UPDATE SET last_seq = c.last_seq + 1, updated_at = now()
    WHERE c.tenant_id = EXCLUDED.tenant_id AND c.user_id = EXCLUDED.user_id RETURNING last_seq
), message AS (
    INSERT INTO messages (conversation_id, seq, id, role, surface_id, content, created_at, model, prompt_tokens, completion_tokens, cost_usd, api_key_id)
    SELECT 'conv_pg_' || :c, last_seq, md5(random()::text), 'user', 'cli', 'Hello, how is the project going?', now(), NULL, NULL, NULL, NULL, 'pgbenchkey' FROM conversation RETURNING seq
), usage_row AS (
    INSERT INTO usage (ts, tenant_id, api_key_id, user_id, conversation_id, surface_id, model, prompt_tokens, completion_tokens, cost_usd)
    SELECT now(), 'pgbench', 'pgbenchkey', 'bench', 'conv_pg_' || :c, 'cli', 'offline', 0, 0, 0 FROM conversation WHERE false
) SELECT seq FROM message;
SELECT m.seq, m.id, m.role, m.surface_id, m.content, m.created_at, m.model, m.prompt_tokens, m.completion_tokens, m.cost_usd
FROM messages m JOIN conversations c ON c.id = m.conversation_id
WHERE c.tenant_id = 'pgbench' AND c.id = 'conv_pg_' || :c AND c.user_id = 'bench' ORDER BY m.seq DESC LIMIT 20;
WITH conversation AS (
    INSERT INTO conversations AS c (tenant_id, id, user_id, last_seq) VALUES ('pgbench', 'conv_pg_' || :c, 'bench', 1)
    ON CONFLICT (id) DO UPDATE SET last_seq = c.last_seq + 1, updated_at = now()
    WHERE c.tenant_id = EXCLUDED.tenant_id AND c.user_id = EXCLUDED.user_id RETURNING last_seq
), message AS (
    INSERT INTO messages (conversation_id, seq, id, role, surface_id, content, created_at, model, prompt_tokens, completion_tokens, cost_usd, api_key_id)
    SELECT 'conv_pg_' || :c, last_seq, md5(random()::text), 'assistant', 'cli', 'A reply of ordinary length for the benchmark.', now(), 'offline', 12, 9, 0, 'pgbenchkey' FROM conversation RETURNING seq
), usage_row AS (
    INSERT INTO usage (ts, tenant_id, api_key_id, user_id, conversation_id, surface_id, model, prompt_tokens, completion_tokens, cost_usd)
    SELECT now(), 'pgbench', 'pgbenchkey', 'bench', 'conv_pg_' || :c, 'cli', 'offline', 12, 9, 0 FROM conversation WHERE true
) SELECT seq FROM message;
SQL

(cd "$bench_work" && pgbench -n -M extended -f turn.sql -c "$CLIENTS" -j 2 -T "$seconds" -l "$url" \
  >pgbench.out 2>&1) || { cat "$bench_work/pgbench.out" >&2; exit 1; }
tps=$(awk '/^tps/ { print int($3) }' "$bench_work/pgbench.out")
failed=$(awk '/number of failed transactions/ { print $5 + 0 }' "$bench_work/pgbench.out")
# Per-transaction log: the third field is the latency in microseconds.
read -r p50 p99 < <(cat "$bench_work"/pgbench_log.* | awk '{ print $3 }' | sort -n |
  awk '{ a[NR] = $1 } END { printf "%.3f %.3f\n", a[int(NR * 0.5)] / 1000, a[int(NR * 0.99)] / 1000 }')
echo "pgbench core-turn baseline: $(date -u +%FT%TZ), $CLIENTS clients, ${seconds} s: $tps TPS, p50 $p50 ms, p99 $p99 ms, ${failed:-0} failed"
bench_result pgbench_tps "$tps"
bench_result pgbench_p50 "$p50"
bench_result pgbench_p99 "$p99"
bench_result pgbench_failed "${failed:-0}"
