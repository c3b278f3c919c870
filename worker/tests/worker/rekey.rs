//! `rekey` against a real Postgres and a `file://` snapshot store: every sealed column and a snapshot object move
//! to the primary keys while a writer keeps changing rows (no value it wrote is lost), the leftovers of a run
//! killed midway are cleaned up, and a second run has nothing to do.

use std::{
    collections::HashMap,
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use berth_worker::{
    rekey::{RekeyOptions, rekey},
    snapshots::{
        Snapshots,
        reseal::resealed_object_key,
        sealed::{Digest256, OpenReader, SealWriter, SnapshotKey},
        store,
    },
};
use broker::crypto::{Cipher, KeyId, key_check_value, seal_v1};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::helpers::*;

const A: [u8; 32] = [0xa1; 32];
const B: [u8; 32] = [0xb2; 32];
/// The next rotation's key, already listed second somewhere: first seen after B, so never retired with A.
const C: [u8; 32] = [0xc3; 32];
const ROWS: usize = 3_000;
/// Rows the concurrent writer rewrites (as an API holding [B, A] would).
const WRITTEN: usize = 300;

async fn insert_rows(pool: &PgPool) {
    let old = Cipher::from_key(&A);
    sqlx::query(
        "INSERT INTO service_instances (id, service_id, plan_id, organization_guid, space_guid, secrets)
         VALUES ('i', 's', 'p', 'o', 's', $1)",
    )
    .bind(seal_v1(&A, b"instance secret"))
    .execute(pool)
    .await
    .unwrap();
    let (ids, sealed): (Vec<String>, Vec<Vec<u8>>) = (0..ROWS)
        .map(|i| {
            let value = format!("binding {i}");
            let sealed = if i % 3 == 0 {
                seal_v1(&A, value.as_bytes())
            } else {
                old.seal(value.as_bytes())
            };
            (format!("b{i:05}"), sealed)
        })
        .unzip();
    sqlx::query(
        "INSERT INTO service_bindings (id, instance_id, service_id, plan_id, credentials)
         SELECT id, 'i', 's', 'p', c FROM unnest($1::text[], $2::bytea[]) AS v(id, c)",
    )
    .bind(&ids)
    .bind(&sealed)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, task_id, url, secret, body) VALUES ($1, $1, 'http://x', $2, '{}')",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(old.seal(b"hook"))
    .execute(pool)
    .await
    .unwrap();
    for (purpose, key) in [
        ("master", A),
        ("master", B),
        ("master", C),
        ("snapshot", A),
        ("snapshot", B),
    ] {
        let id = match purpose {
            "master" => KeyId::of(&key).to_string(),
            _ => SnapshotKey::new(key).id(),
        };
        sqlx::query("INSERT INTO sealing_keys (purpose, key_id, check_value) VALUES ($1, $2, $3)")
            .bind(purpose)
            .bind(id)
            .bind(&key_check_value(&key)[..])
            .execute(pool)
            .await
            .unwrap();
    }
}

/// A backup object sealed with snapshot key A, and its ready row.
async fn insert_snapshot(
    pool: &PgPool,
    dir: &std::path::Path,
    payload: &[u8],
) -> (uuid::Uuid, String) {
    let object_key = format!("backups/x/{}.bsnap", uuid::Uuid::new_v4());
    let mut writer = SealWriter::new(&SnapshotKey::new(A), Vec::new(), 1 << 10).unwrap();
    writer.write_all(payload).unwrap();
    let sealed = writer.finish().unwrap();
    let path = dir.join(&object_key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &sealed).unwrap();
    let mut digest = Digest256::default();
    digest.update(&sealed);
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO snapshots (id, kind, instance_id, task_id, state, object_key, size_bytes, sha256, key_id)
         VALUES ($1, 'backup', 'i', $1, 'ready', $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(&object_key)
    .bind(sealed.len() as i64)
    .bind(digest.hex())
    .bind(SnapshotKey::new(A).id())
    .execute(pool)
    .await
    .unwrap();
    (id, object_key)
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn rekey_moves_everything_to_the_primary_keys_without_losing_a_concurrent_write(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    insert_rows(&pool).await;
    let dir = std::env::temp_dir().join(format!("berth-rekey-{}", uuid::Uuid::new_v4()));
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let (snapshot_id, old_object) = insert_snapshot(&pool, &dir, &payload).await;
    let mut settings = settings();
    settings.snapshot_store_url = Some(format!("file://{}", dir.display()));
    let snapshots = Snapshots::new(store::open(&settings).unwrap(), SnapshotKey::new(B), 3)
        .with_older_keys(vec![SnapshotKey::new(A)]);
    // A run killed after its upload left the copy behind; one killed after its commit left a queued object.
    std::fs::write(
        dir.join(resealed_object_key(&old_object, &SnapshotKey::new(B).id())),
        b"half",
    )
    .unwrap();
    std::fs::write(dir.join("backups/x/replaced.bsnap"), b"old").unwrap();
    sqlx::query(
        "INSERT INTO snapshot_objects_to_delete (object_key) VALUES ('backups/x/replaced.bsnap')",
    )
    .execute(&pool)
    .await
    .unwrap();

    let ring = Cipher::from_keys(&[B, A]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let last_written: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let writer = tokio::spawn({
        let (pool, ring, stop, last_written) = (
            pool.clone(),
            ring.clone(),
            stop.clone(),
            last_written.clone(),
        );
        async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                for i in (0..WRITTEN).map(|i| i * (ROWS / WRITTEN)) {
                    let (id, value) = (format!("b{i:05}"), format!("rewritten {i} round {round}"));
                    sqlx::query("UPDATE service_bindings SET credentials = $2 WHERE id = $1")
                        .bind(&id)
                        .bind(ring.seal(value.as_bytes()))
                        .execute(&pool)
                        .await
                        .unwrap();
                    last_written.lock().unwrap().insert(id, value);
                }
                round += 1;
            }
        }
    });
    let options = RekeyOptions {
        batch_size: 100,
        ..RekeyOptions::default()
    };
    let report = rekey(&pool, &ring, Some(&snapshots), &options)
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    assert_eq!(report.secrets_unopenable, 0, "{report:?}");
    assert_eq!(
        (report.secrets_left, report.snapshots_left),
        (0, 0),
        "{report:?}"
    );
    assert_eq!(report.snapshots_resealed, 1, "{report:?}");
    assert_eq!(
        report.retired_master_keys,
        [KeyId::of(&A).to_string()],
        "{report:?}"
    );
    assert_eq!(
        report.retired_snapshot_keys,
        [SnapshotKey::new(A).id()],
        "{report:?}"
    );
    assert!(
        report.secrets_resealed >= (ROWS - WRITTEN) as u64 + 2,
        "{report:?}"
    );

    // Everything opens with B alone; every value the writer wrote survived.
    let only_b = Cipher::from_key(&B);
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT id, credentials FROM service_bindings ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let last_written = last_written.lock().unwrap().clone();
    for (id, sealed) in &rows {
        let opened = String::from_utf8(only_b.open(sealed).unwrap()).unwrap();
        let expected = last_written
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("binding {}", id[1..].parse::<usize>().unwrap()));
        assert_eq!(opened, expected);
    }
    let secrets: Vec<u8> = sqlx::query_scalar("SELECT secrets FROM service_instances")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(only_b.open(&secrets).unwrap(), b"instance secret");
    let hook: Vec<u8> = sqlx::query_scalar("SELECT secret FROM webhook_deliveries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(only_b.open(&hook).unwrap(), b"hook");

    // The snapshot: its row names B's copy, which opens with B alone; the old and replaced objects are gone.
    let (object_key, key_id, size): (String, String, i64) =
        sqlx::query_as("SELECT object_key, key_id, size_bytes FROM snapshots WHERE id = $1")
            .bind(snapshot_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(key_id, SnapshotKey::new(B).id());
    assert_eq!(object_key, resealed_object_key(&old_object, &key_id));
    let stored = std::fs::read(dir.join(&object_key)).unwrap();
    assert_eq!(stored.len() as i64, size);
    let mut opened = Vec::new();
    std::io::Read::read_to_end(
        &mut OpenReader::new(&SnapshotKey::new(B), stored.as_slice()).unwrap(),
        &mut opened,
    )
    .unwrap();
    assert_eq!(opened, payload);
    assert!(!dir.join(&old_object).exists() && !dir.join("backups/x/replaced.bsnap").exists());
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshot_objects_to_delete")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 0);

    // Idempotent: nothing left to do.
    let again = rekey(&pool, &ring, Some(&snapshots), &options)
        .await
        .unwrap();
    assert_eq!(
        (again.secrets_resealed, again.snapshots_resealed),
        (0, 0),
        "{again:?}"
    );
    println!("rekey under a concurrent writer: {}", report.summary());
    std::fs::remove_dir_all(dir).unwrap();
}
