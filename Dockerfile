# berth's container image: berth-api, berth-worker and the `berth` CLI on Debian bookworm, with the PostgreSQL 15
# client and server programs the local engines (initdb, pg_ctl, postgres) and snapshots (pg_dump, pg_restore,
# psql) run. docs/deploy.md tells how to build and run it.
#
#   docker build -t berth .                       compiles the release binaries in a Rust stage (needs rust:1-bookworm)
#   docker build -t berth --target prebuilt \
#     --build-arg BIN_DIR=target/release .        takes binaries already built on a bookworm-compatible host
#
# The stages are ordered so that `--target prebuilt` never needs the Rust image: the legacy builder (no BuildKit)
# builds every stage up to its target.

ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

# What both final images share: packages, the user, the folders, how a container starts.
FROM ${BASE_IMAGE} AS runtime-base
ARG PG_MAJOR=15
ARG BERTH_UID=10001
# No main cluster from the package: berth makes its own servers (initdb) in its data folder.
RUN set -eux; \
    mkdir -p /etc/postgresql-common/createcluster.d; \
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/berth.conf; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates tini "postgresql-${PG_MAJOR}" "postgresql-client-${PG_MAJOR}"; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    test -x "/usr/lib/postgresql/${PG_MAJOR}/bin/initdb"; \
    test -z "$(ls -A /etc/postgresql 2>/dev/null)"
# A fixed uid/gid so volumes and Kubernetes' runAsNonRoot/runAsUser can name it.
RUN set -eux; \
    groupadd --system --gid "${BERTH_UID}" berth; \
    useradd --system --uid "${BERTH_UID}" --gid berth --home-dir /var/lib/berth --shell /usr/sbin/nologin berth; \
    install -d -o berth -g berth -m 0700 /var/lib/berth
COPY plans/ /usr/share/berth/plans/
ENV PLANS_DIR=/usr/share/berth/plans \
    BERTH_DATA_DIR=/var/lib/berth \
    PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/postgresql/${PG_MAJOR}/bin
WORKDIR /var/lib/berth
VOLUME ["/var/lib/berth"]
EXPOSE 8080
USER ${BERTH_UID}:${BERTH_UID}
# tini is PID 1: it forwards SIGTERM to berth and reaps the orphans the local engines leave (servers started with
# setsid are reparented to PID 1). Exec form throughout, no shell in between.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["berth-api"]

# Binaries built outside Docker (the image test feeds its host's build here). BIN_DIR is relative to the context.
FROM runtime-base AS prebuilt
ARG BIN_DIR=target/release
COPY ${BIN_DIR}/berth-api ${BIN_DIR}/berth-worker ${BIN_DIR}/berth /usr/local/bin/

# The release build, for whoever can pull the Rust image.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN set -eux; \
    SQLX_OFFLINE=true cargo build --release --locked -p berth-api -p berth-worker -p berth-cli --bins; \
    mkdir /out; \
    cp target/release/berth-api target/release/berth-worker target/release/berth /out/

# The default target: the runtime with the binaries compiled above.
FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/
