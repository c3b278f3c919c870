# berth's container image: berth-api, berth-worker and the `berth` CLI on Debian bookworm, with the PostgreSQL 15
# client and server programs the local engines (initdb, pg_ctl, postgres) and snapshots (pg_dump, pg_restore,
# psql) run. docs/deploy.md tells how to build and run it.
#
#   docker build -t berth .            compiles the release binaries in a rust:1-bookworm stage
#   docker build -t berth --build-arg BIN_DIR=target/release --build-arg BUILD_IMAGE=debian:bookworm-slim .
#                                      takes binaries built on a bookworm-compatible host instead (no Rust image)
#
# One final image either way: only where its binaries come from changes. The image test (scripts/image-test.sh)
# takes the second path with its host's debug build.

ARG BASE_IMAGE=debian:bookworm-slim
# The stage that makes or takes the binaries: a Rust image to compile them; any image with a shell when BIN_DIR
# names binaries built elsewhere.
ARG BUILD_IMAGE=rust:1-bookworm

# The runtime: packages, the user, the folders, how a container starts.
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

# The binaries: compiled here (BIN_DIR empty), or taken from BIN_DIR in the build context.
FROM ${BUILD_IMAGE} AS binaries
ARG BIN_DIR=
WORKDIR /src
COPY . .
RUN set -eu; \
    mkdir /out; \
    if [ -n "$BIN_DIR" ]; then \
        for bin in berth-api berth-worker berth; do \
            test -x "$BIN_DIR/$bin" || { echo "BIN_DIR: $BIN_DIR/$bin is missing from the build context" >&2; exit 1; }; \
            cp "$BIN_DIR/$bin" /out/; \
        done; \
    else \
        SQLX_OFFLINE=true cargo build --release --locked -p berth-api -p berth-worker -p berth-cli --bins; \
        cp target/release/berth-api target/release/berth-worker target/release/berth /out/; \
    fi

FROM runtime-base AS runtime
COPY --from=binaries /out/ /usr/local/bin/
