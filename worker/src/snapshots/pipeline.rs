//! The snapshot pipeline, streaming end to end: `pg_dump -Fc` → zstd (multithreaded) → sealed (AES-256-GCM
//! STREAM) → the object store, and back: store → size and SHA-256 check → open → zstd → `pg_restore`. Memory
//! stays bounded (a few parts in flight); nothing is written to local disk but the store itself.

use std::{
    io::{self, Read, Write},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
};

use anyhow::Context as _;
use broker::{config::Settings, db::snapshots::SnapshotRow};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{io::AsyncReadExt, process::Command, sync::mpsc};
use tokio_util::io::SyncIoBridge;
use tracing::info;

use super::{
    sealed::{self, Digest256, HashingReader, HashingWriter, OpenReader, SealWriter, SnapshotKey},
    store::{self, ObjectReader, ObjectStore, PART_SIZE, Part},
    target::ServerLogin,
};
use crate::registry::TaskError;

/// The worker's snapshot machinery: the store, the keys (the first seals, all open) and the compression level.
#[derive(Debug, Clone)]
pub struct Snapshots {
    pub store: Arc<dyn ObjectStore>,
    pub(super) key: SnapshotKey,
    /// Keys that only open (`SNAPSHOT_KEY_FILES` after the first).
    pub(super) older_keys: Vec<SnapshotKey>,
    zstd_level: i32,
}

/// What a finished snapshot measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The stored object.
    pub size_bytes: u64,
    pub sha256: String,
    /// The uncompressed dump.
    pub dump_bytes: u64,
    pub key_id: String,
}

impl Snapshots {
    /// Opens the configured store and reads the keys, making the default key file on first start.
    pub fn open(settings: &Settings) -> anyhow::Result<Self> {
        let (paths, may_create) = settings.snapshot_key_paths();
        let path = paths[0].clone();
        if !path.exists() {
            anyhow::ensure!(
                may_create,
                "SNAPSHOT_KEY_FILE {} does not exist; make one with `berth gen-key --out {}`",
                path.display(),
                path.display()
            );
            match broker::crypto::generate_key_file(&path) {
                Ok(()) => info!(path = %path.display(), "made a new snapshot key"),
                // Another process made it first.
                Err(_) if path.exists() => {}
                Err(e) => return Err(e.context("making the snapshot key")),
            }
        }
        let mut keys = Vec::with_capacity(paths.len());
        for path in &paths {
            let key = broker::crypto::read_key_file(path).context("reading a snapshot key")?;
            keys.push(SnapshotKey::new(key));
        }
        let primary = keys.remove(0);
        Ok(Self::new(
            store::open(settings)?,
            primary,
            settings.snapshot_zstd_level,
        )
        .with_older_keys(keys))
    }

    pub fn new(store: Arc<dyn ObjectStore>, key: SnapshotKey, zstd_level: i32) -> Self {
        Self {
            store,
            key,
            older_keys: Vec::new(),
            zstd_level,
        }
    }

    /// Also opens (never seals) objects sealed with `keys`.
    pub fn with_older_keys(self, keys: Vec<SnapshotKey>) -> Self {
        Self {
            older_keys: keys,
            ..self
        }
    }

    /// The id of the key new snapshots are sealed with.
    pub fn key_id(&self) -> String {
        self.key.id()
    }

    /// Every key, the primary first.
    pub fn keys(&self) -> Vec<SnapshotKey> {
        std::iter::once(self.key.clone())
            .chain(self.older_keys.iter().cloned())
            .collect()
    }

    pub fn holds_key(&self, key_id: &str) -> bool {
        self.keys().iter().any(|k| k.id() == key_id)
    }

    /// Dumps `database` into the object `object_key`. The object appears only if the dump succeeded.
    pub async fn take(
        &self,
        login: &ServerLogin,
        database: &str,
        object_key: &str,
    ) -> Result<Taken, TaskError> {
        let mut child = Command::new(login.program("pg_dump"))
            .args([
                "--format=custom",
                "--compress=0",
                "--no-owner",
                "--no-privileges",
            ])
            .env_clear()
            .envs(login.env(database))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                TaskError::fatal(format!(
                    "starting pg_dump from {}: {e}",
                    login.bin_dir.display()
                ))
            })?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = tokio::spawn(read_tail(child.stderr.take().expect("piped")));

        let (tx, rx) = mpsc::channel::<Part>(2);
        let producer_tx = tx.clone();
        let (key, level) = (self.key.clone(), self.zstd_level);
        let producer = tokio::task::spawn_blocking(move || {
            compress_and_seal(SyncIoBridge::new(stdout), producer_tx, &key, level)
        });
        let finish = async move {
            let produced = producer
                .await
                .map_err(|e| anyhow::anyhow!("the snapshot thread failed: {e}"))?;
            let status = child.wait().await.context("waiting for pg_dump")?;
            let stderr = stderr.await.unwrap_or_default();
            let (dump_bytes, digest) = produced.context("compressing and sealing the dump")?;
            anyhow::ensure!(
                status.success(),
                "pg_dump failed ({status}): {}",
                stderr.trim()
            );
            // Only now may the store publish the object.
            tx.send(Part::End)
                .await
                .map_err(|_| anyhow::anyhow!("the upload stopped early"))?;
            Ok::<_, anyhow::Error>((dump_bytes, digest))
        };
        let (produced, uploaded) = tokio::join!(finish, self.store.put(object_key, rx));
        uploaded.with_context(|| format!("uploading the snapshot to {}", self.store.location()))?;
        let (dump_bytes, digest) = produced?;
        Ok(Taken {
            size_bytes: digest.bytes,
            sha256: digest.hex(),
            dump_bytes,
            key_id: self.key.id(),
        })
    }

    /// A ready snapshot's object, its recorded size and SHA-256: Fatal when the snapshot is incomplete, sealed
    /// with another key, missing from the store or of another size there.
    pub(super) async fn checked_object(
        &self,
        snapshot: &SnapshotRow,
    ) -> Result<(ObjectReader, i64, String), TaskError> {
        let (Some(size), Some(sha256)) = (snapshot.size_bytes, snapshot.sha256.clone()) else {
            return Err(TaskError::fatal(format!(
                "snapshot {} is not complete",
                snapshot.id
            )));
        };
        if let Some(key_id) = &snapshot.key_id
            && !self.holds_key(key_id)
        {
            return Err(TaskError::fatal(format!(
                "snapshot {} was sealed with snapshot key {key_id}, which this worker does not hold (its keys: \
                 {}); add the key file with id {key_id} to SNAPSHOT_KEY_FILES",
                snapshot.id,
                self.keys()
                    .iter()
                    .map(SnapshotKey::id)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let (reader, stored_size) = self
            .store
            .get(&snapshot.object_key)
            .await
            .with_context(|| format!("reading the snapshot from {}", self.store.location()))?
            .ok_or_else(|| {
                TaskError::fatal(format!(
                    "snapshot {} is missing from the store ({}/{})",
                    snapshot.id,
                    self.store.location(),
                    snapshot.object_key
                ))
            })?;
        if stored_size != size as u64 {
            return Err(TaskError::fatal(format!(
                "snapshot {} is damaged: the store holds {stored_size} bytes, {size} were recorded",
                snapshot.id
            )));
        }
        Ok((reader, size, sha256))
    }

    /// Restores a ready snapshot into `database` (empty, made for it) as `role`. The object's size is checked
    /// before anything runs; its key, every chunk and its SHA-256 are checked as it streams. Any failure leaves
    /// `database` half-filled, so callers restore only into scratch databases.
    pub async fn restore(
        &self,
        snapshot: &SnapshotRow,
        login: &ServerLogin,
        database: &str,
        role: &str,
    ) -> Result<(), TaskError> {
        let (reader, size, sha256) = self.checked_object(snapshot).await?;
        let mut child = Command::new(login.program("pg_restore"))
            .args(["--no-owner", "--no-privileges", "--exit-on-error"])
            .arg(format!("--role={role}"))
            .arg(format!("--dbname={database}"))
            .env_clear()
            .envs(login.env(database))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                TaskError::fatal(format!(
                    "starting pg_restore from {}: {e}",
                    login.bin_dir.display()
                ))
            })?;
        let stdin = child.stdin.take().expect("piped");
        let stderr = tokio::spawn(read_tail(child.stderr.take().expect("piped")));
        let keys = self.keys();
        let fed = tokio::task::spawn_blocking(move || {
            open_and_decompress(SyncIoBridge::new(reader), SyncIoBridge::new(stdin), &keys)
        })
        .await
        .map_err(|e| anyhow::anyhow!("the restore thread failed: {e}"))?;
        let digest = match fed {
            Ok(digest) => digest,
            Err(e) => {
                let _ = child.kill().await;
                return Err(match sealed::open_error(&e) {
                    Some(open) => TaskError::fatal(format!("snapshot {}: {open}", snapshot.id)),
                    None if e.kind() == io::ErrorKind::BrokenPipe => {
                        let status = child.wait().await.ok();
                        let tail = stderr.await.unwrap_or_default();
                        TaskError::fatal(format!("pg_restore failed ({status:?}): {}", tail.trim()))
                    }
                    None => {
                        TaskError::fatal(format!("snapshot {} could not be read: {e}", snapshot.id))
                    }
                });
            }
        };
        let (bytes, hex) = (digest.bytes, digest.hex());
        if bytes != size as u64 || hex != sha256 {
            let _ = child.kill().await;
            return Err(TaskError::fatal(format!(
                "snapshot {} is damaged: its SHA-256 is {hex} over {bytes} bytes, {sha256} over {size} was recorded",
                snapshot.id
            )));
        }
        let status = child.wait().await.context("waiting for pg_restore")?;
        if !status.success() {
            let tail = stderr.await.unwrap_or_default();
            return Err(TaskError::fatal(format!(
                "pg_restore failed ({status}): {}",
                tail.trim()
            )));
        }
        Ok(())
    }
}

/// zstd + seal of `dump` into `out` (what [`Snapshots::take`] does between pg_dump and the store; benchmarks
/// time it on its own). Returns the bytes read and `out`.
pub fn compress_and_seal_into<W: Write>(
    dump: impl Read,
    out: W,
    key: &SnapshotKey,
    level: i32,
) -> io::Result<(u64, W)> {
    let mut encoder = encoder(SealWriter::new(key, out, sealed::DEFAULT_CHUNK)?, level)?;
    let read = io::copy(&mut { dump }, &mut encoder)?;
    let out = encoder.finish()?.finish()?;
    Ok((read, out))
}

/// The zstd encoder every snapshot uses: all cores, long-distance matching (repeats across a table's rows far
/// apart, for little extra time).
fn encoder<W: Write>(inner: W, level: i32) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut encoder = zstd::stream::write::Encoder::new(inner, level)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    encoder.multithread(threads)?;
    encoder.long_distance_matching(true)?;
    Ok(encoder)
}

/// pg_dump's output → zstd → seal → hash → parts on `tx` (all but `End`, which the caller sends once pg_dump
/// exited cleanly). Returns the dump's size and the digest of the sealed bytes.
fn compress_and_seal(
    dump: impl Read,
    tx: mpsc::Sender<Part>,
    key: &SnapshotKey,
    level: i32,
) -> io::Result<(u64, Digest256)> {
    let sink = HashingWriter {
        inner: PartWriter::new(tx),
        digest: Digest256::default(),
    };
    let mut encoder = encoder(SealWriter::new(key, sink, sealed::DEFAULT_CHUNK)?, level)?;
    let read = io::copy(&mut { dump }, &mut encoder)?;
    let sealer = encoder.finish()?;
    let mut sink = sealer.finish()?;
    sink.inner.flush_part()?;
    Ok((read, sink.digest))
}

/// store bytes → hash → open → zstd → pg_restore's stdin. Returns the digest of what was read from the store.
fn open_and_decompress(
    object: impl Read,
    mut restore: impl Write,
    keys: &[SnapshotKey],
) -> io::Result<Digest256> {
    let hashing = HashingReader {
        inner: object,
        digest: Digest256::default(),
    };
    let opened = OpenReader::with_keys(keys, hashing)?;
    let mut decoder = zstd::stream::read::Decoder::new(opened)?;
    io::copy(&mut decoder, &mut restore)?;
    restore.flush()?;
    drop(restore);
    let mut opened = decoder.finish().into_inner();
    // The decoder stops at the end of its frame: read on, so the final chunk and the end are checked.
    io::copy(&mut opened, &mut io::sink())?;
    Ok(opened.into_inner().digest)
}

/// Collects bytes into parts of [`PART_SIZE`] for the store.
pub(super) struct PartWriter {
    tx: mpsc::Sender<Part>,
    buf: Vec<u8>,
}

impl PartWriter {
    pub(super) fn new(tx: mpsc::Sender<Part>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(PART_SIZE),
        }
    }

    pub(super) fn flush_part(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let part = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(PART_SIZE),
        ));
        self.tx
            .blocking_send(Part::Data(part))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (PART_SIZE - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == PART_SIZE {
            self.flush_part()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The last few KiB a child wrote to stderr (its error message).
pub(super) async fn read_tail(mut stderr: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut all = Vec::new();
    let _ = stderr.read_to_end(&mut all).await;
    let start = all.len().saturating_sub(4096);
    String::from_utf8_lossy(&all[start..]).into_owned()
}

/// Roles the database's objects belong to or are granted to, recorded beside a snapshot (the dump itself
/// carries no owners or grants: a restore gives everything to the target's owner).
pub async fn roles_of(login: &ServerLogin, database: &str) -> Result<Value, TaskError> {
    let mut conn = login
        .connect(database, "connecting to the database to list its roles")
        .await?;
    let roles: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT r.rolname::text FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
         UNION
         SELECT DISTINCT r.rolname::text FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_%'
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(|e| crate::providers::postgres::classify(e, "listing the database's roles"))?;
    Ok(json!(roles))
}

/// For tests and benchmarks: the folder of PostgreSQL client programs.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    broker::embedded::find_bin_dir()
}
