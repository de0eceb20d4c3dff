#!/usr/bin/env bash
# Growth: does a core request cost the same in a 100,000-message conversation as in a
# 10-message one (local and cloud stores), and does the server's memory stay flat in the number
# of conversations? Release binary, loopback only, bounded in time.
#
# Latency: one conversation of 100,000 messages and one of 10, per store, then the same
# requests (offline responder, GROWTH_CONNECTIONS connections, GROWTH_REQUESTS each) to both,
# alternating short/long twice; p50/p99 are averaged over the two rounds and compared.
#   local: one real turn through the server writes each file's header and first messages; with
#          the server stopped, the long file is extended to 100,000 lines by repeating those
#          two message lines with new seq and id (the format the server wrote, read back by it
#          at start — the 100,000th message is checked through the API); restarted.
#   cloud: a fresh database migrated by `maestra migrate`, prefilled in SQL (generate_series).
# The first request to each after the restart (the long file is read once) is shown apart.
#
# Memory: a fresh local server; 20,000 new conversations (one core request each, no
# conversation_id: the server starts a new one) through HTTP; the server's VmRSS after 100, 1,000 and 20,000.
#   bench/growth.sh
#   GROWTH_CONNECTIONS=8 GROWTH_REQUESTS=1000 CONVERSATIONS=20000 bench/growth.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup
bench_need psql

LONG=${LONG:-100000}
SHORT=${SHORT:-10}
GROWTH_CONNECTIONS=${GROWTH_CONNECTIONS:-8}
GROWTH_REQUESTS=${GROWTH_REQUESTS:-1000}
CONVERSATIONS=${CONVERSATIONS:-20000}

body() { # conversation id
  printf '{"user_id":"bench","surface_id":"cli","conversation_id":"%s","message":"Hello, how is the project going?"}' "$1"
}

# measure LABEL URL [oha header args...]: cold first requests, then alternating rounds; prints
# rows and the ratio; records growth_<label>_ratio_p50 / _p99.
measure() {
  local label=$1 url=$2 conv round row cold
  shift 2
  for conv in short long; do
    cold=$(curl -fs -o /dev/null -w '%{time_total}' -H 'Content-Type: application/json' "$@" \
      -d "$(body "conv_growth_$conv")" "$url/api/maestra/core")
    echo "$label $conv: first request after start $(awk -v t="$cold" 'BEGIN { printf "%.1f", t * 1000 }') ms"
  done
  : >"$bench_work/$label.tsv"
  for round in 1 2; do
    for conv in short long; do
      row=$(oha_run "$label-$conv-$round" -n "$GROWTH_REQUESTS" -c "$GROWTH_CONNECTIONS" -m POST \
        -H 'Content-Type: application/json' "$@" -d "$(body "conv_growth_$conv")" \
        "$url/api/maestra/core")
      echo "$row" | tee -a "$bench_work/$label.tsv"
    done
  done
  read -r r50 r99 errors < <(awk -F'\t' '
    $1 ~ /-short-/ { s50 += $3; s99 += $4 } $1 ~ /-long-/ { l50 += $3; l99 += $4 } { e += $5 }
    END { printf "%.2f %.2f %d\n", l50 / s50, l99 / s99, e }' "$bench_work/$label.tsv")
  echo "$label: long / short latency: p50 ${r50}x, p99 ${r99}x, errors $errors (target: within 1.5x)"
  bench_result "growth_${label}_ratio_p50" "$r50"
  bench_result "growth_${label}_ratio_p99" "$r99"
  bench_result "growth_${label}_errors" "$errors"
}

bench_header "maestra growth benchmark ($LONG vs $SHORT messages, $GROWTH_CONNECTIONS connections, $GROWTH_REQUESTS requests per run)"
printf 'run\treq/s\tp50 ms\tp99 ms\terrors\n'

# --- local store -------------------------------------------------------------------------
start_local growth
for conv in short long; do
  curl -fs -o /dev/null -H 'Content-Type: application/json' -d "$(body "conv_growth_$conv")" \
    "$server_url/api/maestra/core"
done
stop_server "$server_pid"
python3 - "$bench_work/growth/conversations" "$LONG" "$SHORT" <<'PY'
import json, sys
folder, sizes = sys.argv[1], {"long": int(sys.argv[2]), "short": int(sys.argv[3])}
for name, size in sizes.items():
    path = f"{folder}/conv_growth_{name}.json"
    records = [json.loads(line) for line in open(path)]
    messages = [r for r in records if r.get("type") == "message"]
    templates = {m["role"]: m for m in messages}
    last = max(m["seq"] for m in messages)
    with open(path, "a") as out:
        for seq in range(last + 1, size + 1):
            m = dict(templates["user" if seq % 2 else "assistant"])
            m["seq"] = seq
            m["id"] = m["id"][: -len(str(seq)) - 1] + "g" + str(seq)
            out.write(json.dumps(m, separators=(",", ":")) + "\n")
PY
start_local growth
local_server=$server_pid
check=$(curl -fs "$server_url/api/maestra/conversations/conv_growth_long?user_id=bench&after_seq=$((LONG - 1))&limit=5" |
  jq -r '[.messages[]?.seq] | @csv')
echo "local: the long conversation's messages after seq $((LONG - 1)) as the server reads them: [$check]"
measure local "$server_url"
echo "local server peak RSS: $(peak_rss_mb "$local_server") MB"
stop_server "$local_server"

# --- Postgres store ----------------------------------------------------------------------
bench_database maestra_growth
export DATABASE_URL=$db_url
key=$("$MAESTRA" keys create --tenant growth --rate-limit 100000000/60 2>/dev/null)
psql -q "$DATABASE_URL" <<SQL
INSERT INTO owners (tenant_id, user_id, feed_head) VALUES ('growth', 'bench', $LONG + $SHORT);
INSERT INTO conversations (id, tenant_id, user_id, owner_id, last_seq, last_created_at)
  SELECT v.id, 'growth', 'bench', o.id, v.n, now()
  FROM owners o, (VALUES ('conv_growth_long', $LONG), ('conv_growth_short', $SHORT)) AS v (id, n)
  WHERE o.tenant_id = 'growth' AND o.user_id = 'bench';
INSERT INTO messages (conversation_pk, seq, id, role, surface_id, content, created_at, owner_id, feed_seq)
  SELECT c.pk, g, c.id || '_' || g, CASE WHEN g % 2 = 1 THEN 'user' ELSE 'assistant' END, 'cli',
         'message ' || g || ': a line of ordinary length, like a short question or answer.',
         now() - (c.last_seq - g) * interval '1 millisecond', c.owner_id,
         row_number() OVER (ORDER BY c.pk, g)
  FROM conversations c, generate_series(1, c.last_seq) AS g;
ANALYZE;
SQL
start_cloud growth-cloud
measure cloud "$server_url" -H "X-API-Key: $key"
stop_server "$server_pid"

# --- memory in the number of conversations ---------------------------------------------
start_local memory
mem_server=$server_pid
echo "memory: baseline VmRSS $(rss_mb "$mem_server") MB (started, no conversation)"
# No conversation_id: each request starts a new conversation (oha -Z picks lines at random,
# so a file of distinct ids would not give distinct conversations).
new_body='{"user_id":"bench","surface_id":"cli","message":"Hello, how is the project going?"}'
done_count=0
for upto in 100 1000 "$CONVERSATIONS"; do
  oha --no-tui --output-format json -n $((upto - done_count)) -c 8 -m POST \
    -H 'Content-Type: application/json' -d "$new_body" \
    "$server_url/api/maestra/core" >"$bench_work/mem-$upto.json"
  done_count=$upto
  files=$(find "$bench_work/memory/conversations" -name '*.json' | wc -l)
  rss=$(rss_mb "$mem_server")
  echo "memory: after $upto conversations ($files files, $(oha_row x "$bench_work/mem-$upto.json" | cut -f5) errors): VmRSS $rss MB"
  bench_result "memory_rss_$upto" "$rss"
  bench_result "memory_files_$upto" "$files"
done
echo "memory: peak VmHWM $(peak_rss_mb "$mem_server") MB"
