#!/usr/bin/env bash
# Fuzzes every documented route with schemathesis, generated from the server's own
# /openapi.json, in local and in cloud mode: no 5xx, every response fits its schema, invalid
# input refused, valid input accepted, 405s carry Allow. CI runs a bounded pass; for a longer
# one: FUZZ_EXAMPLES=2000 tests/schemathesis.sh
#   needs: a built binary (target/release/maestra or MAESTRA_BIN), `st` (pip install schemathesis),
#          DATABASE_URL pointing at a Postgres server (a scratch database is made and dropped).
set -euo pipefail
cd "$(dirname "$0")/.."

EXAMPLES=${FUZZ_EXAMPLES:-30}
ST=${ST:-st}
MAESTRA_BIN=${MAESTRA_BIN:-target/release/maestra}
ADMIN_URL=${DATABASE_URL:?DATABASE_URL must point at Postgres}
work=$(mktemp -d)
db="maestra_fuzz_$$"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_ready() { # url
  for _ in $(seq 100); do curl -fs "$1/health/ready" >/dev/null && return 0; sleep 0.1; done
  echo "fuzz: the server at $1 did not start" >&2
  return 1
}

fuzz() { # name, url, extra st arguments...
  local name=$1 url=$2; shift 2
  echo "== schemathesis ($name mode, $EXAMPLES examples per operation)"
  "$ST" run "$url/openapi.json" --checks all --max-examples "$EXAMPLES" \
    --seed "${FUZZ_SEED:-20261125}" "$@"
}

MAESTRA_PORT=0 MAESTRA_DATA_DIR="$work/local" MAESTRA_LOG_LEVEL=warn "$MAESTRA_BIN" serve >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/local/maestra.port" ] && break; sleep 0.1; done
local_url="http://127.0.0.1:$(cat "$work/local/maestra.port")"
wait_ready "$local_url"
fuzz local "$local_url"

psql -q "$ADMIN_URL" -c "CREATE DATABASE $db"
key=sk_fuzz_key_0123456789
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MAESTRA_MODE=cloud MAESTRA_HOST=127.0.0.1 MAESTRA_PORT=$port DATABASE_URL="${ADMIN_URL%/*}/$db" \
  MAESTRA_API_KEY=$key MAESTRA_RATE_LIMIT_REQUESTS=1000000 MAESTRA_SYNC_RATE_LIMIT_REQUESTS=1000000 \
  MAESTRA_AUTH_FAILURE_LIMIT=1000000 MAESTRA_METRICS_TOKEN=fuzz-token \
  MAESTRA_LOG_LEVEL=warn "$MAESTRA_BIN" serve >/dev/null 2>&1 &
pids+=($!)
cloud_url="http://127.0.0.1:$port"
wait_ready "$cloud_url"
fuzz cloud "$cloud_url" --header "X-API-Key: $key" --header "Authorization: Bearer fuzz-token"
