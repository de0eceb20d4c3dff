#!/usr/bin/env bash
# The cost of tracing export: local-mode core throughput with OpenTelemetry export off, then
# on (OTLP/HTTP to a sink on loopback), in one run against the release binary. Metrics are
# always on. Bounded in time, loopback only.
#   bench/tracing.sh                 # 10 s per run, 32 connections
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup

# An OTLP/HTTP sink that accepts every export.
python3 - "$bench_work/sink.port" <<'PY' &
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
bench_pids+=($!)
for _ in $(seq 50); do [ -s "$bench_work/sink.port" ] && break; sleep 0.1; done
sink="http://127.0.0.1:$(cat "$bench_work/sink.port")"

core_bodies conv_trace 64 >"$bench_work/bodies.jsonl"

run() { # name, extra environment...
  local name=$1 row
  shift
  start_local "$name" "$@"
  row=$(oha_run "$name" -c "$CONNECTIONS" -m POST -H 'Content-Type: application/json' \
    -Z "$bench_work/bodies.jsonl" "$server_url/api/maestra/core")
  stop_server "$server_pid"
  printf '%s\t%s\t%s\n' "$name" "$(col 2 "$row")" "$(col 4 "$row")"
}

bench_header "tracing export cost ($DURATION x $CONNECTIONS connections)"
printf 'run\treq/s\tp99 ms\n'
# Alternating runs, so that disk and CPU weather fall on both sides alike.
for round in 1 2; do
  run "export-off-$round" >>"$bench_work/results.tsv"
  run "export-on-$round" OTEL_EXPORTER_OTLP_ENDPOINT="$sink" >>"$bench_work/results.tsv"
done
cat "$bench_work/results.tsv"
awk '/^export-off/ { off += $2 } /^export-on/ { on += $2 }
  END { printf "ratio on/off: %.3f (target: within 10%%)\n", on / off }' "$bench_work/results.tsv"
