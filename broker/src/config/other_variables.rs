//! Environment variables berth reads besides its settings (the `berth` CLI's included), each listed on the
//! settings page; a test scans the sources for reads and fails on one that is in neither list.

/// A variable read outside [`super::Settings`].
#[derive(Debug, Clone, Copy)]
pub struct OtherVariable {
    pub name: &'static str,
    pub kind: OtherKind,
    pub meaning: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherKind {
    /// Read by the server binaries; an operator may set it.
    Process,
    /// Read by the `berth` command line tool.
    Cli,
    /// Set by berth itself (or its build and tests); not for operators.
    Internal,
}

pub const OTHER_VARIABLES: &[OtherVariable] = &[
    other(
        "BERTH_CONFIG",
        OtherKind::Process,
        "TOML file of settings (the `--config FILE` flag wins over it); keys are the names above in lower case.",
    ),
    other(
        "RUST_LOG",
        OtherKind::Process,
        "Log filter (default `info,sqlx=warn,tower_http=info`).",
    ),
    other(
        "PG_BIN_DIR",
        OtherKind::Process,
        "Folder of the PostgreSQL server binaries (initdb, pg_ctl) for the embedded default and the `local` \
         engine (default: the newest /usr/lib/postgresql/*/bin, else `pg_config --bindir`).",
    ),
    other(
        "BERTH_PG_OS_USER",
        OtherKind::Process,
        "When running as root, the OS user the embedded Postgres runs as (default `postgres`).",
    ),
    other(
        "HOSTNAME",
        OtherKind::Process,
        "Fallback host name for WORKER_ID and LOCAL_ENGINE_HOST.",
    ),
    other(
        "PATH",
        OtherKind::Process,
        "Where etcd and patroni are looked for (the `ha` plan on `local`).",
    ),
    other(
        "BERTH_URL",
        OtherKind::Cli,
        "The broker's URL (default http://127.0.0.1:$PORT).",
    ),
    other(
        "PORT",
        OtherKind::Cli,
        "Port of the default BERTH_URL (default 8080).",
    ),
    other(
        "BROKER_USERNAME",
        OtherKind::Cli,
        "Basic-auth user (`--user`).",
    ),
    other(
        "BROKER_PASSWORD",
        OtherKind::Cli,
        "Basic-auth password (`--password`).",
    ),
    other(
        "BERTH_LOCK_KEY",
        OtherKind::Cli,
        "The key that holds a preset lock (`--lock-key`).",
    ),
    other(
        "BERTH_DATA_DIR",
        OtherKind::Cli,
        "Where the embedded default's credentials are found.",
    ),
    other(
        "USER",
        OtherKind::Cli,
        "Recorded as the author of a preset push (`--author`).",
    ),
    other(
        "BERTH_STOP_WHEN_STDIN_CLOSES",
        OtherKind::Internal,
        "Set by the embedded default's API on its worker: stop when the API is gone.",
    ),
    other(
        "BERTH_GIT_COMMIT",
        OtherKind::Internal,
        "Build time: the commit `--version` shows when the build has no git checkout (release builds).",
    ),
    other(
        "BERTH_VERSION",
        OtherKind::Internal,
        "Build time: the line `--version` prints, set by the binaries' build script.",
    ),
    other(
        "BERTH_UPDATE_DOCS",
        OtherKind::Internal,
        "Tests: `BERTH_UPDATE_DOCS=1 cargo test -p broker config::` rewrites docs/settings.md's tables.",
    ),
];

const fn other(name: &'static str, kind: OtherKind, meaning: &'static str) -> OtherVariable {
    OtherVariable {
        name,
        kind,
        meaning,
    }
}
