//! `sealing_key_checks`: one check value per sealing key, recorded by the first process that starts and
//! compared by every later one (see [`crate::crypto::key_check_value`]).

use std::path::Path;

use anyhow::Context;
use sqlx::PgPool;

use crate::crypto::{Cipher, key_check_value, read_key_file};

/// The key that seals secrets in the broker's database (`BERTH_KEY_FILE`).
pub const MASTER_KEY: &str = "master";
/// The key that seals presets and backups in the snapshot store (`SNAPSHOT_KEY_FILE`).
pub const SNAPSHOT_KEY: &str = "snapshot";

/// Fails, naming the file, unless the key in `path` (`BERTH_KEY_FILE`) is the one this database's secrets are
/// sealed with. A database that already holds sealed secrets but no check value (made before checks existed)
/// is first tried with the key: a key that opens none of them is refused rather than recorded.
pub async fn verify_master_key(pool: &PgPool, path: &Path) -> anyhow::Result<()> {
    let key = read_key_file(path)?;
    let fits = match any_sealed_secret(pool).await? {
        Some(sealed) => Cipher::from_key(&key).open(&sealed).is_ok(),
        None => true,
    };
    verify(pool, MASTER_KEY, &key, path, "BERTH_KEY_FILE", fits).await
}

/// The same for the snapshot key in `path` (`SNAPSHOT_KEY_FILE`), whose public id is `key_id`: with no check
/// value yet, the newest complete snapshot must have been sealed with it.
pub async fn verify_snapshot_key(pool: &PgPool, path: &Path, key_id: &str) -> anyhow::Result<()> {
    let key = read_key_file(path)?;
    let newest: Option<String> = sqlx::query_scalar(
        "SELECT key_id FROM snapshots WHERE state = 'ready' AND key_id IS NOT NULL ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .context("looking for snapshots")?;
    let fits = newest.is_none_or(|newest| newest == key_id);
    verify(pool, SNAPSHOT_KEY, &key, path, "SNAPSHOT_KEY_FILE", fits).await
}

/// For a key file that does not exist yet: fails, naming it, when another process already recorded a key
/// under `name` (a key made here would differ from the one the others use).
pub async fn refuse_a_missing_key(
    pool: &PgPool,
    name: &str,
    path: &Path,
    setting: &str,
) -> anyhow::Result<()> {
    if recorded(pool, name).await?.is_some() {
        anyhow::bail!(
            "the key file {} ({setting}) does not exist, but other processes of this broker already use a key: \
             copy their key file there, or point {setting} at it",
            path.display()
        );
    }
    Ok(())
}

/// Records `key`'s check value under `name` unless one is there (insert-if-absent, then compare, so two
/// processes starting at once on a fresh database agree on one), then compares. `fits_existing_data` says
/// whether the key opens what the database already refers to; it only matters while nothing is recorded.
async fn verify(
    pool: &PgPool,
    name: &str,
    key: &[u8; 32],
    path: &Path,
    setting: &str,
    fits_existing_data: bool,
) -> anyhow::Result<()> {
    let ours = key_check_value(key);
    let wrong_key = || {
        anyhow::anyhow!(
            "the key file {} ({setting}) is not the key this broker's data is sealed with: every API and worker \
             must use the same key file; start this process with the key the others use",
            path.display()
        )
    };
    if recorded(pool, name).await?.is_none() {
        if !fits_existing_data {
            return Err(wrong_key());
        }
        sqlx::query(
            "INSERT INTO sealing_key_checks (name, check_value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(&ours[..])
        .execute(pool)
        .await
        .context("recording the sealing key's check value")?;
    }
    let recorded = recorded(pool, name)
        .await?
        .context("the sealing key's check value vanished")?;
    if !crate::crypto::constant_time_eq(&recorded, &ours) {
        return Err(wrong_key());
    }
    Ok(())
}

async fn recorded(pool: &PgPool, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    sqlx::query_scalar("SELECT check_value FROM sealing_key_checks WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .context("reading the sealing key's check value")
}

/// One secret sealed with the master key, if the database holds any.
async fn any_sealed_secret(pool: &PgPool) -> anyhow::Result<Option<Vec<u8>>> {
    sqlx::query_scalar(
        "(SELECT credentials FROM service_bindings WHERE credentials IS NOT NULL LIMIT 1)
         UNION ALL (SELECT secrets FROM service_instances WHERE secrets IS NOT NULL LIMIT 1)
         UNION ALL (SELECT webhook_secret FROM tasks WHERE webhook_secret IS NOT NULL LIMIT 1)
         UNION ALL (SELECT secret FROM webhook_deliveries LIMIT 1)
         LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .context("looking for sealed secrets")
}
