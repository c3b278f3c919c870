//! `sealing_key_checks`: one check value per sealing key, recorded by the first process that starts and
//! compared by every later one (see [`crate::crypto::key_check_value`]).

use std::path::Path;

use anyhow::Context;
use sqlx::PgPool;

use crate::crypto::{Cipher, key_check_value};

/// The name of the key that seals secrets in the broker's database (`BERTH_KEY_FILE`).
pub const MASTER_KEY: &str = "master";

/// Fails, naming `path` and `setting`, unless `key` is the key this database's secrets are sealed with. The
/// first process to start records the key's check value (insert-if-absent, then compare, so two processes
/// starting at once on a fresh database agree on one). A database that already holds sealed secrets but no
/// check value (made before checks existed) is first tried with the key: a key that opens none of them is
/// refused rather than recorded.
pub async fn verify(pool: &PgPool, key: &[u8; 32], path: &Path, setting: &str) -> anyhow::Result<()> {
    let ours = key_check_value(key);
    let wrong_key = || {
        anyhow::anyhow!(
            "the key file {} ({setting}) is not the key this broker's database is sealed with: every API and \
             worker must use the same key file; start this process with the key the others use",
            path.display()
        )
    };
    if recorded(pool).await?.is_none() {
        if let Some(sealed) = any_sealed_secret(pool).await? {
            Cipher::from_key(key).open(&sealed).map_err(|_| wrong_key())?;
        }
        sqlx::query(
            "INSERT INTO sealing_key_checks (name, check_value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(MASTER_KEY)
        .bind(&ours[..])
        .execute(pool)
        .await
        .context("recording the sealing key's check value")?;
    }
    let recorded = recorded(pool).await?.context("the sealing key's check value vanished")?;
    if !crate::crypto::constant_time_eq(&recorded, &ours) {
        return Err(wrong_key());
    }
    Ok(())
}

/// [`verify`] for the key in the file at `path`.
pub async fn verify_key_file(pool: &PgPool, path: &Path, setting: &str) -> anyhow::Result<()> {
    verify(pool, &crate::crypto::read_key_file(path)?, path, setting).await
}

async fn recorded(pool: &PgPool) -> anyhow::Result<Option<Vec<u8>>> {
    sqlx::query_scalar("SELECT check_value FROM sealing_key_checks WHERE name = $1")
        .bind(MASTER_KEY)
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
