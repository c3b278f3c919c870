//! The start-up check of the sealing keys (docs/keys.md). `sealing_keys` records every key a process brings
//! (its public id and check value, see [`crate::crypto::key_check_value`]); a process refuses to start when a
//! key the database still uses (recorded, not retired) is missing from its list, or when a listed key's id is
//! recorded with another check value. `sealing_key_checks` (one check value per purpose, from the release
//! before key ids) is read to adopt its key and kept filled for that release's binaries.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sqlx::PgPool;

use crate::crypto::{Cipher, KeyId, constant_time_eq, key_check_value, read_key_file};

/// The keys that seal secrets in the broker's database (`BERTH_KEY_FILES`).
pub const MASTER_KEY: &str = "master";
/// The keys that seal presets and backups in the snapshot store (`SNAPSHOT_KEY_FILES`).
pub const SNAPSHOT_KEY: &str = "snapshot";

/// One key of a process's list, as the check sees it.
#[derive(Debug, Clone)]
pub struct ListedKey {
    pub id: String,
    pub check_value: [u8; 32],
    pub path: PathBuf,
}

/// The keys of one purpose a process holds, the primary first, and the setting that lists them.
#[derive(Debug, Clone)]
pub struct KeyList {
    pub purpose: &'static str,
    pub setting: &'static str,
    pub keys: Vec<ListedKey>,
}

/// A recorded key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecordedKey {
    pub key_id: String,
    pub check_value: Vec<u8>,
    pub retired: bool,
}

/// Checks the master key files in `paths` (the primary first) against the database. With nothing recorded
/// yet, a database that already holds sealed secrets (made before checks existed) must open with the list.
pub async fn verify_master_keys(pool: &PgPool, paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut keys = Vec::new();
    for path in paths {
        let key = read_key_file(path)?;
        keys.push(ListedKey {
            id: KeyId::of(&key).to_string(),
            check_value: key_check_value(&key),
            path: path.clone(),
        });
    }
    let cipher = Cipher::from_key_files(paths)?;
    let fits = match any_sealed_secret(pool).await? {
        Some(sealed) => cipher.open(&sealed).is_ok(),
        None => true,
    };
    let list = KeyList {
        purpose: MASTER_KEY,
        setting: "BERTH_KEY_FILES (or BERTH_KEY_FILE)",
        keys,
    };
    verify(pool, &list, fits).await
}

/// The same for snapshot keys (`list.purpose` = [`SNAPSHOT_KEY`]): with nothing recorded yet, the newest
/// complete snapshot must have been sealed with a listed key.
pub async fn verify_snapshot_keys(pool: &PgPool, list: &KeyList) -> anyhow::Result<()> {
    let newest: Option<String> = sqlx::query_scalar(
        "SELECT key_id FROM snapshots WHERE state = 'ready' AND key_id IS NOT NULL ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .context("looking for snapshots")?;
    let fits = newest.is_none_or(|newest| list.keys.iter().any(|k| k.id == newest));
    verify(pool, list, fits).await
}

/// For a key file that does not exist yet: fails, naming it, when another process already recorded a key
/// under `name` that is still in use (a key made here would differ from the one the others use).
pub async fn refuse_a_missing_key(
    pool: &PgPool,
    name: &str,
    path: &Path,
    setting: &str,
) -> anyhow::Result<()> {
    let in_use = recorded(pool, name).await?.iter().any(|k| !k.retired)
        || legacy_check_value(pool, name).await?.is_some();
    if in_use {
        anyhow::bail!(
            "the key file {} ({setting}) does not exist, but other processes of this broker already use a key: \
             copy their key file there, or point {setting} at it",
            path.display()
        );
    }
    Ok(())
}

/// Every key recorded for `purpose`, in the order first seen.
pub async fn recorded(pool: &PgPool, purpose: &str) -> anyhow::Result<Vec<RecordedKey>> {
    sqlx::query_as(
        "SELECT key_id, check_value, retired_at IS NOT NULL AS retired FROM sealing_keys WHERE purpose = $1
         ORDER BY seq",
    )
    .bind(purpose)
    .fetch_all(pool)
    .await
    .context("reading the recorded sealing keys")
}

/// Marks the recorded keys of `purpose` first seen before `keep` (the primary) as retired (`berth-worker rekey`,
/// once nothing is sealed with another key); the ids it retired. Keys first seen after it are the next
/// rotation's, listed second ahead of becoming primary: retiring them would refuse them as primary later.
pub async fn retire_all_but(
    pool: &PgPool,
    purpose: &str,
    keep: &str,
) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar(
        "UPDATE sealing_keys SET retired_at = now()
         WHERE purpose = $1 AND key_id <> $2 AND retired_at IS NULL
           AND seq < (SELECT seq FROM sealing_keys WHERE purpose = $1 AND key_id = $2)
         RETURNING key_id",
    )
    .bind(purpose)
    .bind(keep)
    .fetch_all(pool)
    .await
    .context("retiring sealing keys")
}

/// Refuses before it records anything (a refused process must not leave its keys behind as "in use"), then
/// records every listed key. On a fresh database the legacy check value is written first and decides which of
/// two processes starting at once with different keys wins.
async fn verify(pool: &PgPool, list: &KeyList, fits_existing_data: bool) -> anyhow::Result<()> {
    let (purpose, setting) = (list.purpose, list.setting);
    let primary = list.keys.first().context("no key listed")?;
    // Whether this process set the legacy value on a fresh database: then its list alone orders the records.
    let mut first_here = false;
    if recorded(pool, purpose).await?.is_empty() {
        if !fits_existing_data {
            anyhow::bail!(
                "the key files {} ({setting}) are not the keys this broker's data is sealed with: every API and \
                 worker must hold the keys the others use; start this process with them",
                paths(&list.keys)
            );
        }
        // Also what the previous release's binaries compare against.
        first_here = sqlx::query(
            "INSERT INTO sealing_key_checks (name, check_value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(purpose)
        .bind(&primary.check_value[..])
        .execute(pool)
        .await
        .context("recording the sealing key's check value")?
        .rows_affected()
            == 1;
    }
    if !first_here {
        adopt_legacy_key(pool, list).await?;
    }

    let recorded = recorded(pool, purpose).await?;
    for key in &list.keys {
        if let Some(r) = recorded.iter().find(|r| r.key_id == key.id)
            && !constant_time_eq(&r.check_value, &key.check_value)
        {
            anyhow::bail!(
                "the key file {} ({setting}) has id {} but is not the key recorded under that id: start this \
                 process with the key file the others use",
                key.path.display(),
                key.id
            );
        }
    }
    let missing: Vec<&str> = recorded
        .iter()
        .filter(|r| !r.retired && list.keys.iter().all(|k| k.id != r.key_id))
        .map(|r| r.key_id.as_str())
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "this broker's {purpose} data is still sealed (in part) with the key(s) {} that {setting} does not \
             list ({}): add the key file with that id to {setting}; a key may be removed only after \
             `berth-worker rekey` has re-sealed everything with the primary and retired it",
            missing.join(", "),
            paths(&list.keys)
        );
    }
    if recorded.iter().any(|r| r.retired && r.key_id == primary.id) {
        anyhow::bail!(
            "the key file {} (first in {setting}, the key new data is sealed with) has id {}, which \
             `berth-worker rekey` retired: other processes may no longer hold it; put the current key first",
            primary.path.display(),
            primary.id
        );
    }
    // The last listed first: a list names its older keys after the primary.
    for key in list.keys.iter().rev() {
        record(pool, purpose, key).await?;
    }
    // For the previous release's binaries, when a database lost the value (or never had it).
    sqlx::query(
        "INSERT INTO sealing_key_checks (name, check_value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(purpose)
    .bind(&primary.check_value[..])
    .execute(pool)
    .await
    .context("recording the sealing key's check value")?;
    Ok(())
}

async fn record(pool: &PgPool, purpose: &str, key: &ListedKey) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO sealing_keys (purpose, key_id, check_value) VALUES ($1, $2, $3)
         ON CONFLICT (purpose, key_id) DO NOTHING",
    )
    .bind(purpose)
    .bind(&key.id)
    .bind(&key.check_value[..])
    .execute(pool)
    .await
    .context("recording a sealing key")?;
    Ok(())
}

/// A database checked by the release before key ids holds one check value per purpose: the listed key it
/// belongs to is recorded with its id (once), and a list without it is refused.
async fn adopt_legacy_key(pool: &PgPool, list: &KeyList) -> anyhow::Result<()> {
    let Some(legacy) = legacy_check_value(pool, list.purpose).await? else {
        return Ok(());
    };
    let recorded = recorded(pool, list.purpose).await?;
    if recorded
        .iter()
        .any(|r| constant_time_eq(&r.check_value, &legacy))
    {
        return Ok(());
    }
    let Some(key) = list
        .keys
        .iter()
        .find(|k| constant_time_eq(&k.check_value, &legacy))
    else {
        anyhow::bail!(
            "the key files {} ({}) are not the key this broker's data is sealed with: every API and worker \
             must hold the key the others use; start this process with it",
            paths(&list.keys),
            list.setting
        );
    };
    record(pool, list.purpose, key).await
}

async fn legacy_check_value(pool: &PgPool, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    sqlx::query_scalar("SELECT check_value FROM sealing_key_checks WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .context("reading the sealing key's check value")
}

fn paths(keys: &[ListedKey]) -> String {
    keys.iter()
        .map(|k| k.path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
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
