//! The snapshot benchmark's measuring half (`bench/snapshots/run.sh` makes the database and runs the anchors):
//!
//!   berth-bench snapshot-seal --file DUMP [--level L]
//!       zstd + seal of a dump file, as the pipeline does it (the compressor half, against `xz -6 -T0`)
//!   berth-bench snapshot-cycle --pg-url U --database D --store-dir DIR [--level L]
//!       the whole pipeline: take (pg_dump → zstd → seal → file store), restore into a new database, then a
//!       preset: the template built once, and a new instance's database cloned from it
//!
//! Each prints JSON lines: {"figure": ..., "ms": ..., "bytes": ...}.

use std::{io, path::PathBuf, time::Instant};

use anyhow::Context;
use berth_worker::snapshots::{
    BindingGrant, DatabaseTarget, ServerLogin, Snapshots, apply, pipeline, sealed::SnapshotKey,
    store,
};
use broker::db::snapshots::SnapshotRow;
use secrecy::SecretString;
use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::Args;

fn key() -> SnapshotKey {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0x5a;
    }
    SnapshotKey::new(bytes)
}

fn emit(figure: &str, ms: f64, bytes: Option<u64>) {
    println!("{}", json!({ "figure": figure, "ms": ms, "bytes": bytes }));
}

/// A writer that only counts.
struct Counter(u64);

impl io::Write for Counter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0 += data.len() as u64;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn seal(args: &Args) -> anyhow::Result<()> {
    let file = std::fs::File::open(args.get("file")?).context("opening the dump")?;
    let level = args.num("level", 6)?;
    let t0 = Instant::now();
    let (read, sealed) =
        pipeline::compress_and_seal_into(io::BufReader::new(file), Counter(0), &key(), level)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    eprintln!("sealed {read} dump bytes into {} bytes", sealed.0);
    emit(
        &format!("zstd-{level}+seal of the dump file"),
        ms,
        Some(sealed.0),
    );
    Ok(())
}

pub async fn cycle(args: &Args) -> anyhow::Result<()> {
    let pg_url = args.get("pg-url")?;
    let database = args.get("database")?;
    let level = args.num("level", 6)?;
    let store_dir = PathBuf::from(args.get("store-dir")?);
    let settings: broker::config::Settings = serde_json::from_value(json!({
        "snapshot_store_url": format!("file://{}", store_dir.display()),
    }))?;
    let snaps = Snapshots::new(store::open(&settings)?, key(), level);
    let login = ServerLogin::from_url(
        &SecretString::from(pg_url.to_string()),
        pipeline::bin_dir()?,
    )?;

    // Take.
    let object_key = "bench/snapshot.bsnap";
    let t0 = Instant::now();
    let taken = snaps
        .take(&login, database, object_key)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    emit(
        "berth snapshot: pg_dump → zstd → seal → store",
        t0.elapsed().as_secs_f64() * 1e3,
        Some(taken.size_bytes),
    );
    eprintln!(
        "dump {} bytes, stored {} bytes",
        taken.dump_bytes, taken.size_bytes
    );
    let row = SnapshotRow {
        id: uuid::Uuid::new_v4(),
        kind: "preset".into(),
        preset_id: None,
        version: Some(1),
        instance_id: None,
        task_id: uuid::Uuid::new_v4(),
        state: broker::db::snapshots::SnapshotState::Ready,
        object_key: object_key.into(),
        size_bytes: Some(taken.size_bytes as i64),
        sha256: Some(taken.sha256.clone()),
        dump_bytes: Some(taken.dump_bytes as i64),
        key_id: Some(taken.key_id.clone()),
        roles: None,
        description: None,
        created_by: None,
        created_at: chrono::Utc::now(),
        completed_at: None,
    };

    // Restore into a new database (the backup path, before its swap).
    let mut admin = PgConnection::connect(pg_url).await?;
    for db in ["bench_restored", "bench_app_a", "bench_app_b"] {
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
    }
    sqlx::raw_sql("DROP ROLE IF EXISTS bench_owner; CREATE ROLE bench_owner NOLOGIN")
        .execute(&mut admin)
        .await?;
    sqlx::raw_sql("CREATE DATABASE bench_restored OWNER bench_owner")
        .execute(&mut admin)
        .await?;
    let t0 = Instant::now();
    snaps
        .restore(&row, &login, "bench_restored", "bench_owner")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    emit(
        "berth restore: store → open → zstd → pg_restore",
        t0.elapsed().as_secs_f64() * 1e3,
        None,
    );

    // A preset: the first instance builds the template (a restore), the next is a clone.
    for (db, figure) in [
        (
            "bench_app_a",
            "preset, first instance on the server (template built)",
        ),
        (
            "bench_app_b",
            "preset, next instance (template clone + swap)",
        ),
    ] {
        sqlx::raw_sql(&format!("CREATE DATABASE {db} OWNER bench_owner"))
            .execute(&mut admin)
            .await?;
        let target = DatabaseTarget {
            login: login.clone(),
            database: db.into(),
            owner: "bench_owner".into(),
            bindings: Vec::<BindingGrant>::new(),
            extensions: Vec::new(),
        };
        let t0 = Instant::now();
        apply::select_preset(&snaps, "bench_", &target, &row, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        emit(figure, t0.elapsed().as_secs_f64() * 1e3, None);
    }
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = 'bench_app_b'")
            .fetch_one(&mut admin)
            .await?;
    anyhow::ensure!(count == 1, "the cloned database is missing");
    Ok(())
}
