#!/usr/bin/env bash
# The database floor for cloud mode: one core request's database work, as pgbench sees it —
# read the last 20 messages, then in one transaction bump the conversation's seq and insert
# two messages — on the same Postgres, schema and machine. Prints TPS and p99.
#   bench/pgbench.sh                  # 10 s, 16 clients
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
cargo build --release --locked --quiet

db="maestra_pgbench_$$"
work=$(mktemp -d)
psql -q "$ADMIN_URL" -c "CREATE DATABASE $db"
trap 'psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"; rm -rf "$work"' EXIT
url="${ADMIN_URL%/*}/$db"
DATABASE_URL=$url target/release/maestra migrate >/dev/null

# One conversation per client, as in the HTTP benchmarks' spread.
psql -q "$url" <<SQL
INSERT INTO tenants (id) VALUES ('bench');
INSERT INTO conversations (id, tenant_id, user_id, last_seq)
  SELECT 'conv_pg_' || g, 'bench', 'bench', 0 FROM generate_series(1, 64) AS g;
SQL

cat >"$work/turn.sql" <<'SQL'
\set c random(1, 64)
SELECT seq, content FROM messages WHERE conversation_id = 'conv_pg_' || :c ORDER BY seq DESC LIMIT 20;
BEGIN;
UPDATE conversations SET last_seq = last_seq + 2, updated_at = now() WHERE id = 'conv_pg_' || :c RETURNING last_seq;
INSERT INTO messages (conversation_id, seq, id, role, surface_id, content)
  SELECT 'conv_pg_' || :c, last_seq - 1, md5(random()::text), 'user', 'bench', 'Hello, how is the project going?'
  FROM conversations WHERE id = 'conv_pg_' || :c;
INSERT INTO messages (conversation_id, seq, id, role, surface_id, content)
  SELECT 'conv_pg_' || :c, last_seq, md5(random()::text), 'assistant', 'bench', 'A reply of ordinary length for the benchmark.'
  FROM conversations WHERE id = 'conv_pg_' || :c;
COMMIT;
SQL

cd "$work"
pgbench -n -f turn.sql -c "$CLIENTS" -j 2 -T "$DURATION" -l "$url" >pgbench.out 2>&1 || { cat pgbench.out >&2; exit 1; }
tps=$(awk '/^tps/ { print int($3) }' pgbench.out)
# Per-transaction log: the third field is the latency in microseconds.
p99=$(cat pgbench_log.* | awk '{ print $3 }' | sort -n | awk '{ a[NR] = $1 } END { printf "%.2f", a[int(NR * 0.99)] / 1000 }')
echo "pgbench core-turn baseline: $(date -u +%FT%TZ), $CLIENTS clients, ${DURATION} s: $tps TPS, p99 $p99 ms"
