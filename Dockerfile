# MetaManager container image. Used by docker-compose.yml, which runs it against
# the compose `mosquitto` broker (conf/docker.yaml).
#
#   docker build -t metamanager .

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# SQLite is compiled in (rusqlite's `bundled` feature) with the image's C
# compiler, so no system SQLite is needed in either stage. Cargo.toml patches
# rumqttd with the copy in vendor/, so that comes too. tests/dockerfile.rs runs
# this stage's RUN on exactly what these COPY lines take from the context (less
# what .dockerignore excludes), so a path the build needs and they miss or
# .dockerignore drops fails CI.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY vendor ./vendor

# --locked: build exactly the dependency versions in Cargo.lock.
RUN cargo build --release --locked \
 && install -m 0755 target/release/metamanager /usr/local/bin/metamanager

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

# Unprivileged user that owns the database directory. The directory is created
# and chowned before VOLUME so that a new named volume starts with this owner.
RUN useradd --system --uid 10001 --user-group \
        --home-dir /var/lib/metamanager --shell /usr/sbin/nologin metamanager \
 && mkdir -p /var/lib/metamanager \
 && chown metamanager:metamanager /var/lib/metamanager

COPY --from=builder /usr/local/bin/metamanager /usr/local/bin/metamanager
COPY conf/docker.yaml /etc/metamanager/config.yaml

VOLUME /var/lib/metamanager
WORKDIR /var/lib/metamanager
USER metamanager

ENV RUST_LOG=info
# SIGTERM (docker stop): MetaManager finishes in-flight work, publishes its
# offline status, closes the database and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["metamanager", "--config", "/etc/metamanager/config.yaml"]
