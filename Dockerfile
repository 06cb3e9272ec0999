# syntax=docker/dockerfile:1

# ---- builder: pinned Rust on Debian bookworm ---------------------------------
FROM rust:1.95.0-bookworm AS builder
WORKDIR /build

# Dependencies first, in their own layer: this only rebuilds when Cargo.toml or
# Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/chunkstream-* target/release/deps/chunkstream-* target/release/deps/libchunkstream-*

COPY src ./src
RUN cargo build --release --locked \
    && install -m 0755 target/release/chunkstream /usr/local/bin/chunkstream

# ---- runtime: the binary and CA certificates, nothing else -------------------
FROM debian:12.12-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="chunkstream" \
      org.opencontainers.image.description="Uploads growing video files from a polled directory (NFS-friendly) to S3 in ordered, checkpointed chunks." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:12.12-slim"

# A fixed, documented uid/gid (10001): NFS exports grant access by number.
RUN groupadd --gid 10001 chunkstream \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin chunkstream \
    && mkdir /input-videos

COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /usr/local/bin/chunkstream /usr/local/bin/chunkstream

ENV WATCH_DIR=/input-videos \
    METRICS_ADDR=0.0.0.0:9102
USER 10001:10001
WORKDIR /
EXPOSE 9102
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["chunkstream", "healthcheck"]
ENTRYPOINT ["chunkstream"]
CMD ["run"]
