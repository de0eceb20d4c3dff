# Maestra Backend in cloud mode (Postgres via DATABASE_URL, API keys, port 8000).
#
#   docker build -t maestra .
#   docker run --rm -p 8000:8000 -e DATABASE_URL=postgres://... -e MAESTRA_API_KEY=sk_... maestra
#
# tests/deploy.rs checks this file's key lines, and .ci/run runs the same cargo build command.

# The build and runtime images must be the same Debian release (the binary links its glibc).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src

# Dependencies first, against placeholder sources: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/append.rs \
    && cargo build --release --locked \
    && rm -rf src benches

COPY . .
# COPY keeps the files' own times, which can be older than the placeholder build: touch them so
# cargo rebuilds the crate. migrations/ is created when absent so the COPY below always works.
RUN touch src/main.rs src/lib.rs \
    && mkdir -p migrations \
    && cargo build --release --locked

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# curl is for the HEALTHCHECK; ca-certificates for TLS to the database and the model provider.
# Not pinned: Debian's stable updates are security fixes, and old versions leave the mirror.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 maestra \
    && useradd --system --uid 10001 --gid maestra --home-dir /home/maestra --create-home \
       --shell /usr/sbin/nologin maestra

COPY --from=build /src/target/release/maestra /usr/local/bin/maestra
# The binary embeds its migrations; the folder is here for operators to read.
COPY --from=build /src/migrations /app/migrations
# The licence the binary is distributed under (GPL-3.0-or-later) travels with it.
COPY --from=build /src/LICENSE /usr/share/doc/maestra/LICENSE
WORKDIR /app

ENV MAESTRA_MODE=cloud \
    MAESTRA_HOST=0.0.0.0 \
    MAESTRA_PORT=8000
EXPOSE 8000
USER 10001:10001

# /health needs no key and never calls the model; 503 (storage down) fails the check.
# Through sh so that a MAESTRA_PORT given at `docker run` is honoured.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${MAESTRA_PORT:-8000}/health || exit 1"]

# maestra is PID 1 (exec form, no shell) and handles SIGTERM itself: it stops accepting, lets
# in-flight requests finish (up to 30 s), then exits. Use `docker stop -t 35` to allow all of it.
STOPSIGNAL SIGTERM
CMD ["maestra", "serve"]
