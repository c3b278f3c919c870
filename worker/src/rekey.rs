//! `berth-worker rekey` (docs/keys.md): re-seals every stored secret and snapshot that is not sealed with the
//! primary key, while the broker serves, then retires the keys nothing uses any more so processes may drop
//! them. Idempotent; two runs at once are safe (compare-and-swap updates, snapshot rows locked while copied).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use broker::{
    config::Settings,
    crypto::Cipher,
    db::{
        key_checks::{self, MASTER_KEY, SNAPSHOT_KEY},
        snapshots::SnapshotRow,
    },
};
use sqlx::PgPool;
use tracing::{info, warn};

use crate::snapshots::{Snapshots, sealed::SnapshotKey};

/// How `rekey` runs.
#[derive(Debug, Clone)]
pub struct RekeyOptions {
    /// Rows read and updated per statement (each batch is its own short transaction).
    pub batch_size: i64,
    /// Leave snapshots alone (no snapshot store here, say).
    pub skip_snapshots: bool,
}

impl Default for RekeyOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            skip_snapshots: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RekeyReport {
    /// Secrets re-sealed with the primary key.
    pub secrets_resealed: u64,
    /// Secrets another writer changed between read and update (left to it; they are sealed with its primary).
    pub secrets_changed_meanwhile: u64,
    /// Secrets that would not open (kept as they are; their keys are not retired).
    pub secrets_unopenable: u64,
    pub secrets_seconds: f64,
    pub snapshots_resealed: u64,
    pub snapshots_failed: u64,
    pub snapshot_bytes: u64,
    pub snapshots_seconds: f64,
    /// Secrets and snapshots still sealed with another key after the run.
    pub secrets_left: i64,
    pub snapshots_left: i64,
    pub retired_master_keys: Vec<String>,
    pub retired_snapshot_keys: Vec<String>,
    pub elapsed: Duration,
}

impl RekeyReport {
    /// Whether everything is sealed with the primary keys now (else no key was retired: run again once the
    /// cause is fixed).
    pub fn complete(&self) -> bool {
        self.secrets_left == 0
            && self.secrets_unopenable == 0
            && self.snapshots_left == 0
            && self.snapshots_failed == 0
    }

    /// The summary `berth-worker rekey` prints.
    pub fn summary(&self) -> String {
        let rate = self.secrets_resealed as f64 / self.secrets_seconds.max(1e-6);
        let mut lines = vec![
            format!(
                "secrets: {} re-sealed in {:.2} s ({rate:.0}/s), {} changed meanwhile by another writer, {} would \
                 not open, {} still sealed with another key",
                self.secrets_resealed,
                self.secrets_seconds,
                self.secrets_changed_meanwhile,
                self.secrets_unopenable,
                self.secrets_left
            ),
            format!(
                "snapshots: {} re-sealed ({} bytes) in {:.2} s, {} failed, {} still sealed with another key",
                self.snapshots_resealed,
                self.snapshot_bytes,
                self.snapshots_seconds,
                self.snapshots_failed,
                self.snapshots_left
            ),
        ];
        for (what, ids, setting) in [
            ("master", &self.retired_master_keys, "BERTH_KEY_FILES"),
            (
                "snapshot",
                &self.retired_snapshot_keys,
                "SNAPSHOT_KEY_FILES",
            ),
        ] {
            if !ids.is_empty() {
                lines.push(format!(
                    "retired {what} keys {} (nothing is sealed with them any more): remove them from {setting}",
                    ids.join(", ")
                ));
            }
        }
        lines.push(format!("done in {:.2} s", self.elapsed.as_secs_f64()));
        lines.join("\n")
    }
}

/// A column holding sealed values: its table, the table's key column and that key's SQL type.
struct SealedColumn {
    table: &'static str,
    id: &'static str,
    id_type: &'static str,
    column: &'static str,
}

/// Every column sealed with the master key (keep in step with the migrations and key_checks' first-start probe).
const SEALED_COLUMNS: &[SealedColumn] = &[
    SealedColumn {
        table: "service_bindings",
        id: "id",
        id_type: "text",
        column: "credentials",
    },
    SealedColumn {
        table: "service_instances",
        id: "id",
        id_type: "text",
        column: "secrets",
    },
    SealedColumn {
        table: "webhook_deliveries",
        id: "id",
        id_type: "uuid",
        column: "secret",
    },
    SealedColumn {
        table: "tasks",
        id: "id",
        id_type: "uuid",
        column: "webhook_secret",
    },
];

/// Connects, checks the keys as every process does at start (so a run without a key still in use is refused),
/// then [`rekey`]s and prints the summary.
pub async fn run(settings: Settings, options: RekeyOptions) -> anyhow::Result<RekeyReport> {
    let url = settings
        .database_url
        .clone()
        .context("DATABASE_URL is not set: rekey needs the broker's database")?;
    let cipher = Cipher::from_key_files(&settings.key_paths())?;
    let pool = broker::db::connect(&url, 4).await?;
    broker::MIGRATOR
        .run(&pool)
        .await
        .context("running the broker's migrations")?;
    key_checks::verify_master_keys(&pool, &settings.key_paths()).await?;
    let snapshots = if options.skip_snapshots {
        None
    } else {
        let snapshots = Snapshots::open(&settings)?;
        key_checks::verify_snapshot_keys(&pool, &snapshot_key_list(&settings)?).await?;
        Some(snapshots)
    };
    let report = rekey(&pool, &cipher, snapshots.as_ref(), &options).await?;
    println!("{}", report.summary());
    Ok(report)
}

/// The snapshot key files of `settings` as the start-up check sees them (the files must exist).
pub fn snapshot_key_list(settings: &Settings) -> anyhow::Result<key_checks::KeyList> {
    let (paths, _) = settings.snapshot_key_paths();
    let mut keys = Vec::with_capacity(paths.len());
    for path in paths {
        let key = SnapshotKey::new(broker::crypto::read_key_file(&path)?);
        anyhow::ensure!(
            keys.iter()
                .all(|k: &key_checks::ListedKey| k.id != key.id()),
            "the snapshot key with id {} is listed twice in SNAPSHOT_KEY_FILES",
            key.id()
        );
        keys.push(key_checks::ListedKey {
            id: key.id(),
            check_value: key.check_value(),
            path,
        });
    }
    Ok(key_checks::KeyList {
        purpose: SNAPSHOT_KEY,
        setting: "SNAPSHOT_KEY_FILES (or SNAPSHOT_KEY_FILE)",
        keys,
    })
}

/// Re-seals secrets (two passes: the second catches values written by a process that still sealed with an old
/// key during the first), then snapshots, then retires what nothing uses.
pub async fn rekey(
    pool: &PgPool,
    cipher: &Cipher,
    snapshots: Option<&Snapshots>,
    options: &RekeyOptions,
) -> anyhow::Result<RekeyReport> {
    let started = Instant::now();
    let mut report = RekeyReport::default();
    for _pass in 0..2 {
        for column in SEALED_COLUMNS {
            reseal_column(pool, cipher, column, options.batch_size, &mut report).await?;
        }
    }
    report.secrets_seconds = started.elapsed().as_secs_f64();
    report.secrets_left = secrets_not_sealed_with_primary(pool, cipher).await?;
    if report.secrets_left == 0 && report.secrets_unopenable == 0 {
        report.retired_master_keys =
            key_checks::retire_all_but(pool, MASTER_KEY, &cipher.primary_id().to_string()).await?;
    } else {
        warn!(
            left = report.secrets_left,
            "secrets are still sealed with other keys: no master key retired"
        );
    }
    if let Some(snapshots) = snapshots {
        let began = Instant::now();
        delete_replaced_objects(pool, snapshots).await?;
        reseal_snapshots(pool, snapshots, &mut report).await?;
        delete_replaced_objects(pool, snapshots).await?;
        report.snapshots_seconds = began.elapsed().as_secs_f64();
        report.snapshots_left = snapshots_not_sealed_with_primary(pool, snapshots).await?;
        if report.snapshots_left == 0 {
            report.retired_snapshot_keys =
                key_checks::retire_all_but(pool, SNAPSHOT_KEY, &snapshots.key_id()).await?;
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// One pass over a column in key order, `batch` rows at a time. Each batch is one compare-and-swap UPDATE: a
/// row changed since it was read keeps its new value.
async fn reseal_column(
    pool: &PgPool,
    cipher: &Cipher,
    col: &SealedColumn,
    batch: i64,
    report: &mut RekeyReport,
) -> anyhow::Result<()> {
    let SealedColumn {
        table,
        id,
        id_type,
        column,
    } = col;
    let header = primary_header(cipher);
    let select = format!(
        "SELECT {id}::text, {column} FROM {table}
         WHERE {column} IS NOT NULL AND substring({column} from 1 for 9) <> $1
           AND {id} > $2::{id_type}
         ORDER BY {id} LIMIT $3"
    );
    let update = format!(
        "UPDATE {table} AS t SET {column} = v.new
         FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS v(id, old, new)
         WHERE t.{id} = v.id::{id_type} AND t.{column} = v.old"
    );
    // Below every key: '' for text ids, the nil uuid (never a row's id) for uuids.
    let mut after = match *id_type {
        "uuid" => uuid::Uuid::nil().to_string(),
        _ => String::new(),
    };
    loop {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(&select)
            .bind(&header)
            .bind(&after)
            .bind(batch)
            .fetch_all(pool)
            .await
            .with_context(|| format!("reading {table}.{column}"))?;
        let Some((last, _)) = rows.last() else {
            return Ok(());
        };
        after = last.clone();
        let (mut ids, mut olds, mut news) = (Vec::new(), Vec::new(), Vec::new());
        for (row_id, sealed) in rows {
            match cipher.reseal(&sealed) {
                Ok(new) => {
                    ids.push(row_id);
                    olds.push(sealed);
                    news.push(new);
                }
                Err(e) => {
                    report.secrets_unopenable += 1;
                    warn!(%table, id = %row_id, "a sealed value would not open: {e:#}");
                }
            }
        }
        let updated = sqlx::query(&update)
            .bind(&ids)
            .bind(&olds)
            .bind(&news)
            .execute(pool)
            .await
            .with_context(|| format!("re-sealing {table}.{column}"))?
            .rows_affected();
        report.secrets_resealed += updated;
        report.secrets_changed_meanwhile += ids.len() as u64 - updated;
    }
}

/// The first 9 bytes of every value sealed with the primary key (format 2 and its id).
fn primary_header(cipher: &Cipher) -> Vec<u8> {
    let mut header = vec![2u8];
    header.extend_from_slice(cipher.primary_id().as_bytes());
    header
}

async fn secrets_not_sealed_with_primary(pool: &PgPool, cipher: &Cipher) -> anyhow::Result<i64> {
    let mut left = 0;
    for SealedColumn { table, column, .. } in SEALED_COLUMNS {
        let count: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE {column} IS NOT NULL AND substring({column} from 1 for 9) <> $1"
        ))
        .bind(primary_header(cipher))
        .fetch_one(pool)
        .await
        .with_context(|| format!("counting {table}.{column}"))?;
        left += count;
    }
    Ok(left)
}

/// Re-seals every ready snapshot sealed with another key, one at a time. The row stays locked while its
/// object is copied (a second run skips it); the copy and the old object's deletion are recorded in the
/// transaction that points the row at the copy.
async fn reseal_snapshots(
    pool: &PgPool,
    snapshots: &Snapshots,
    report: &mut RekeyReport,
) -> anyhow::Result<()> {
    let mut failed: Vec<uuid::Uuid> = Vec::new();
    loop {
        let mut tx = pool.begin().await.context("starting a transaction")?;
        let row: Option<SnapshotRow> = sqlx::query_as(
            "SELECT * FROM snapshots WHERE state = 'ready' AND key_id IS DISTINCT FROM $1 AND NOT id = ANY($2)
             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .bind(snapshots.key_id())
        .bind(&failed)
        .fetch_optional(&mut *tx)
        .await
        .context("picking a snapshot to re-seal")?;
        let Some(row) = row else {
            return Ok(());
        };
        let copy = match snapshots.reseal(&row).await {
            Ok(copy) => copy,
            Err(e) => {
                warn!(snapshot = %row.id, "could not re-seal the snapshot: {e:#}");
                report.snapshots_failed += 1;
                failed.push(row.id);
                continue;
            }
        };
        sqlx::query(
            "UPDATE snapshots SET object_key = $2, size_bytes = $3, sha256 = $4, key_id = $5 WHERE id = $1",
        )
        .bind(row.id)
        .bind(&copy.object_key)
        .bind(copy.size_bytes as i64)
        .bind(&copy.sha256)
        .bind(&copy.key_id)
        .execute(&mut *tx)
        .await
        .context("pointing the snapshot at its re-sealed object")?;
        sqlx::query("INSERT INTO snapshot_objects_to_delete (object_key) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(&row.object_key)
            .execute(&mut *tx)
            .await
            .context("queueing the old object's deletion")?;
        tx.commit()
            .await
            .context("committing the re-sealed snapshot")?;
        info!(snapshot = %row.id, key = %copy.key_id, "re-sealed a snapshot");
        report.snapshots_resealed += 1;
        report.snapshot_bytes += copy.size_bytes;
        delete_replaced_objects(pool, snapshots).await?;
    }
}

/// Deletes the objects re-sealed copies replaced (this run's, and those a killed run left).
async fn delete_replaced_objects(pool: &PgPool, snapshots: &Snapshots) -> anyhow::Result<()> {
    crate::snapshots::deletion::delete_queued_objects(pool, snapshots).await?;
    Ok(())
}

async fn snapshots_not_sealed_with_primary(
    pool: &PgPool,
    snapshots: &Snapshots,
) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM snapshots WHERE state = 'ready' AND key_id IS DISTINCT FROM $1",
    )
    .bind(snapshots.key_id())
    .fetch_one(pool)
    .await
    .context("counting snapshots")
}
