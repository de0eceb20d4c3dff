#!/usr/bin/env bash
# Installs the local Maestra backend (the guide's `bash install_maestra_local.sh`):
#   1. builds the release binary (cargo build --release --locked),
#   2. copies it to $MAESTRA_INSTALL_DIR (default ~/.local/bin),
#   3. registers the auto-start service with `maestra install` (launchd on macOS, a systemd user
#      unit on Linux); where Linux has no systemd user session (a container, say) it starts
#      `maestra serve` in the background instead, which will not come back after a reboot,
#   4. waits until /health answers and prints the URL.
# Running it again is safe: it rebuilds, replaces the binary and restarts the server.
#
# Usage: bash install_maestra_local.sh [--dry-run]
#   --dry-run  build, then show what would be installed and run, and change nothing else.
# Settings it honours: MAESTRA_INSTALL_DIR, MAESTRA_DATA_DIR (default ~/.8825), MAESTRA_PORT,
# MAESTRA_HOST, and the other MAESTRA_* settings `maestra install` carries into the service.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() {
    printf 'install_maestra_local.sh: %s\n' "$*" >&2
    exit 1
}

dry_run=false
for arg in "$@"; do
    case "$arg" in
        --dry-run | -n) dry_run=true ;;
        -h | --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown option $arg (try --help)" ;;
    esac
done

[[ -n "${HOME:-}" ]] || die "HOME is not set"
# Paths given relative to where the script was started from, made absolute before the cd below.
absolute() {
    # shellcheck disable=SC2088 # matches a literal "~/" that no shell expanded
    case "$1" in
        /*) printf '%s' "$1" ;;
        "~/"*) printf '%s' "$HOME/${1#"~/"}" ;;
        *) printf '%s' "$PWD/$1" ;;
    esac
}
install_dir=$(absolute "${MAESTRA_INSTALL_DIR:-$HOME/.local/bin}")
bin=$install_dir/maestra
data_dir=$(absolute "${MAESTRA_DATA_DIR:-$HOME/.8825}")
if [[ -n "${MAESTRA_DATA_DIR:-}" ]]; then export MAESTRA_DATA_DIR=$data_dir; fi
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
    CARGO_TARGET_DIR=$(absolute "$CARGO_TARGET_DIR")
    export CARGO_TARGET_DIR
fi
cd "$(dirname "$0")"
command -v cargo > /dev/null || die "cargo was not found: install Rust first (https://rustup.rs)"
# Used only when there is no service manager: the background server's pid and its log.
pid_file=$data_dir/maestra.pid
log_file=$data_dir/maestra.log

# Whether `maestra install` can register a service here. Linux needs a systemd user session.
has_service_manager() {
    case "$(uname -s)" in
        Darwin) command -v launchctl > /dev/null ;;
        Linux) command -v systemctl > /dev/null && systemctl --user show --property=Version > /dev/null 2>&1 ;;
        *) return 1 ;;
    esac
}

# Whether the pid is a live maestra process (not another program that reused the pid, and not
# an exited one waiting to be reaped).
is_maestra() {
    [[ "$1" =~ ^[0-9]+$ ]] \
        && [[ "$(ps -o comm= -p "$1" 2> /dev/null)" == maestra ]] \
        && [[ "$(ps -o stat= -p "$1" 2> /dev/null)" != Z* ]]
}

# Stops a server that an earlier run of this script started in the background, if it still runs.
stop_background_server() {
    [[ -f "$pid_file" ]] || return 0
    local pid
    pid=$(cat "$pid_file")
    if is_maestra "$pid"; then
        say "stopping the background server started earlier (pid $pid)"
        kill -TERM "$pid"
        # It lets in-flight requests finish: up to 30 s.
        for _ in $(seq 1 350); do
            is_maestra "$pid" || break
            sleep 0.1
        done
        ! is_maestra "$pid" || die "the server (pid $pid) did not stop; stop it and run this again"
    fi
    rm -f "$pid_file"
}

# The base URL of the running server, once /health answers (it writes its port at start).
wait_for_health() {
    local host=${MAESTRA_HOST:-127.0.0.1} port
    case "$host" in 0.0.0.0 | "") host=127.0.0.1 ;; :: | "[::]") host='[::1]' ;; *:*) host="[$host]" ;; esac
    for _ in $(seq 1 300); do
        port=$(cat "$data_dir/maestra.port" 2> /dev/null || true)
        if [[ "$port" =~ ^[0-9]+$ ]] && curl -fsS --max-time 2 "http://$host:$port/health" > /dev/null 2>&1; then
            printf '%s' "$port"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

say "building the release binary: cargo build --release --locked"
cargo build --release --locked || die "the build failed (above)"
built=$(absolute "${CARGO_TARGET_DIR:-target}/release/maestra")
[[ -x "$built" ]] || die "the build did not produce $built"

if $dry_run; then
    say "dry run: nothing below is done"
    echo "would copy $built to $bin"
    [[ -f "$pid_file" ]] && echo "would stop the background server recorded in $pid_file"
    "$built" install --dry-run --binary "$bin"
    if ! has_service_manager; then
        echo "no service manager here (on Linux: no systemd user session), so instead of the"
        echo "steps above it would start '$bin serve' in the background, logging to $log_file"
    fi
    exit 0
fi

command -v curl > /dev/null || die "curl was not found: it is needed to check /health"
say "installing $bin"
mkdir -p "$install_dir"
# Copy then rename: replacing a running binary in place fails ("Text file busy").
cp "$built" "$bin.new"
chmod 0755 "$bin.new"
mv -f "$bin.new" "$bin"

stop_background_server
say "registering the auto-start service: $bin install"
if "$bin" install; then
    how="the auto-start service (it starts again at login)"
elif has_service_manager; then
    die "maestra install failed (above)"
else
    say "no systemd user session here (a container, or SSH without lingering), so the auto-start"
    say "service cannot be registered: maestra serve starts in the background instead, and will"
    say "not start again after a reboot. Log: $log_file"
    [[ -d "$data_dir" ]] || { mkdir -p "$(dirname "$data_dir")" && mkdir -m 700 "$data_dir"; }
    (umask 077 && : >> "$log_file")
    # The server outlives this terminal and its Ctrl-C: its own session where setsid exists.
    if command -v setsid > /dev/null; then
        setsid "$bin" serve < /dev/null >> "$log_file" 2>&1 &
    else
        nohup "$bin" serve < /dev/null >> "$log_file" 2>&1 &
    fi
    echo $! > "$pid_file"
    how="a background process (pid $(cat "$pid_file")); stop it with: kill \$(cat $pid_file)"
fi

say "waiting for /health"
if ! port=$(wait_for_health); then
    if [[ -f "$pid_file" ]]; then
        tail -n 5 "$log_file" >&2 || true
    fi
    die "maestra did not answer /health within 30 s (see the log above, or journalctl --user -u maestra, or ~/Library/Logs/maestra_backend_error.log)"
fi
if [[ -f "$pid_file" ]] && ! is_maestra "$(cat "$pid_file")"; then
    tail -n 5 "$log_file" >&2 || true
    die "the background server exited; another server answers on port $port"
fi
say "Maestra is running at http://localhost:$port, as $how"
echo "    check it: curl http://localhost:$port/health"
