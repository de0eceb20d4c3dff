#!/usr/bin/env bash
# The cost of tracing export: local-mode core throughput with OpenTelemetry export off, then
# on (OTLP/HTTP to a sink on loopback), in one run against the release binary. Metrics are
# always on. Bounded in time, loopback only.
#   bench/tracing.sh                 # 10 s per run, 32 connections
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
command -v oha >/dev/null || cargo install oha --locked
cargo build --release --locked --quiet

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# An OTLP/HTTP sink that accepts every export and counts the bytes.
python3 - "$work/sink.port" <<'PY' &
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
open(sys.argv[1], "w").write(str(server.server_address[1]))
server.serve_forever()
PY
pids+=($!)
for _ in $(seq 50); do [ -s "$work/sink.port" ] && break; sleep 0.1; done

for i in $(seq 64); do
  printf '{"user_id":"bench","surface_id":"cli","conversation_id":"conv_trace_%d","message":"Hello"}\n' "$i"
done >"$work/bodies.jsonl"

run() { # name, extra environment...
  local name=$1; shift
  mkdir -p "$work/$name"
  env MAESTRA_PORT=0 MAESTRA_DATA_DIR="$work/$name" MAESTRA_LOG_LEVEL=warn "$@" \
    target/release/maestra serve >/dev/null 2>&1 &
  local server=$!
  pids+=("$server")
  for _ in $(seq 100); do [ -s "$work/$name/maestra.port" ] && break; sleep 0.1; done
  oha --no-tui --output-format json -z "$DURATION" -c "$CONNECTIONS" -m POST \
    -H 'Content-Type: application/json' -Z "$work/bodies.jsonl" \
    "http://127.0.0.1:$(cat "$work/$name/maestra.port")/api/maestra/core" >"$work/$name.json"
  kill "$server"; wait "$server" 2>/dev/null || true
  jq -r --arg n "$name" '[$n, (.summary.requestsPerSec | floor),
    (.latencyPercentiles.p99 * 1e6 | round / 1e3)] | @tsv' "$work/$name.json"
}

echo "tracing export cost: $(date -u +%FT%TZ), $(nproc) cores, $DURATION x $CONNECTIONS connections"
printf 'run\treq/s\tp99 ms\n'
# Alternating runs, so that disk and CPU weather fall on both sides alike.
sink="http://127.0.0.1:$(cat "$work/sink.port")"
results=$(for round in 1 2; do
  run "export-off-$round"
  run "export-on-$round" OTEL_EXPORTER_OTLP_ENDPOINT="$sink"
done)
echo "$results"
awk '/^export-off/ { off += $2 } /^export-on/ { on += $2 }
  END { printf "ratio on/off: %.3f (target: within 10%%)\n", on / off }' <<<"$results"
