//! Re-sealing a stored snapshot with the primary snapshot key (`berth-worker rekey`): the object streams from
//! the store through open (any held key) and seal (the primary) into a new object; the compressed dump inside is
//! not touched. The old object's size and SHA-256 are checked on the way, as a restore checks them.

use std::io;

use anyhow::Context as _;
use broker::db::snapshots::SnapshotRow;
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

use super::{
    Snapshots,
    pipeline::PartWriter,
    sealed::{self, Digest256, HashingReader, HashingWriter, OpenReader, SealWriter, SnapshotKey},
    store::Part,
};

/// The re-sealed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resealed {
    pub object_key: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub key_id: String,
}

/// The name of `object_key`'s copy sealed with `key_id` (`….k<key id>.bsnap`): deterministic, so a run killed
/// after the upload overwrites its copy on the next run instead of leaving another behind.
pub fn resealed_object_key(object_key: &str, key_id: &str) -> String {
    let (stem, ext) = match object_key.strip_suffix(".bsnap") {
        Some(stem) => (stem, ".bsnap"),
        None => (object_key, ""),
    };
    let stem = match stem.rsplit_once(".k") {
        Some((base, id)) if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) => base,
        _ => stem,
    };
    format!("{stem}.k{key_id}{ext}")
}

impl Snapshots {
    /// Writes `snapshot`'s object again, sealed with the primary key, under [`resealed_object_key`]. The old
    /// object stays; the caller points the row at the copy and deletes it.
    pub async fn reseal(&self, snapshot: &SnapshotRow) -> anyhow::Result<Resealed> {
        let (reader, size, sha256) = self
            .checked_object(snapshot)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let object_key = resealed_object_key(&snapshot.object_key, &self.key.id());
        let (tx, rx) = mpsc::channel::<Part>(2);
        let producer_tx = tx.clone();
        let (keys, primary) = (self.keys(), self.key.clone());
        let producer = tokio::task::spawn_blocking(move || {
            open_and_seal(SyncIoBridge::new(reader), producer_tx, &keys, &primary)
        });
        let id = snapshot.id;
        let finish = async move {
            let (read, written) = producer
                .await
                .map_err(|e| anyhow::anyhow!("the re-seal thread failed: {e}"))?
                .with_context(|| format!("re-sealing snapshot {id}"))?;
            let (bytes, hex) = (read.bytes, read.hex());
            anyhow::ensure!(
                bytes == size as u64 && hex == sha256,
                "snapshot {id} is damaged: its SHA-256 is {hex} over {bytes} bytes, {sha256} over {size} was \
                 recorded; left as it is"
            );
            // Only a complete, checked copy may appear in the store.
            tx.send(Part::End)
                .await
                .map_err(|_| anyhow::anyhow!("the upload stopped early"))?;
            Ok::<_, anyhow::Error>(written)
        };
        let (written, uploaded) = tokio::join!(finish, self.store.put(&object_key, rx));
        uploaded.with_context(|| format!("uploading the re-sealed snapshot {id}"))?;
        let written = written?;
        Ok(Resealed {
            object_key,
            size_bytes: written.bytes,
            sha256: written.hex(),
            key_id: self.key.id(),
        })
    }
}

/// old object → hash → open → seal → hash → parts on `tx` (all but `End`). The digests of what was read and
/// of what was written.
fn open_and_seal(
    object: impl io::Read,
    tx: mpsc::Sender<Part>,
    keys: &[SnapshotKey],
    primary: &SnapshotKey,
) -> io::Result<(Digest256, Digest256)> {
    let hashing = HashingReader {
        inner: object,
        digest: Digest256::default(),
    };
    let mut opened = OpenReader::with_keys(keys, hashing)?;
    let sink = HashingWriter {
        inner: PartWriter::new(tx),
        digest: Digest256::default(),
    };
    let mut sealer = SealWriter::new(primary, sink, sealed::DEFAULT_CHUNK)?;
    io::copy(&mut opened, &mut sealer)?;
    let mut sink = sealer.finish()?;
    sink.inner.flush_part()?;
    Ok((opened.into_inner().digest, sink.digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_of_a_copy_replaces_the_key_in_its_name() {
        let first = resealed_object_key("presets/a/b/v1-123.bsnap", "0123456789abcdef");
        assert_eq!(first, "presets/a/b/v1-123.k0123456789abcdef.bsnap");
        assert_eq!(
            resealed_object_key(&first, "fedcba9876543210"),
            "presets/a/b/v1-123.kfedcba9876543210.bsnap"
        );
        assert_eq!(
            resealed_object_key("x.kiwi", "0123456789abcdef"),
            "x.kiwi.k0123456789abcdef"
        );
    }
}
