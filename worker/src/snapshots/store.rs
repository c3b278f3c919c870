//! Where snapshot objects live: a folder (`file:///dir`, the embedded default) or an S3 bucket
//! (`s3://bucket/prefix`, AWS or any S3-compatible endpoint). An object becomes visible only once it is
//! complete (a rename; a completed multipart upload), so a worker killed mid-upload leaves nothing readable.

use std::{path::PathBuf, pin::Pin, sync::Arc};

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use aws_sdk_s3::{
    primitives::ByteStream,
    types::{CompletedMultipartUpload, CompletedPart},
};
use broker::config::Settings;
use bytes::Bytes;
use secrecy::ExposeSecret;
use tokio::{
    io::{AsyncRead, AsyncWriteExt},
    sync::mpsc,
};

use crate::providers::aws::{self, errors::describe};

/// One piece of an object on its way to the store. `End` says the producer finished cleanly: a channel that
/// closes without it is a failed snapshot, and the store discards what it received.
#[derive(Debug)]
pub enum Part {
    Data(Bytes),
    End,
}

pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Stores what arrives on `parts` as `key`, visible only after `Part::End`.
    async fn put(&self, key: &str, parts: mpsc::Receiver<Part>) -> anyhow::Result<()>;
    /// The object's bytes; `Ok(None)` when there is no such object.
    async fn get(&self, key: &str) -> anyhow::Result<Option<(ObjectReader, u64)>>;
    /// Removes the object; a missing one is fine.
    async fn delete(&self, key: &str) -> anyhow::Result<()>;
    /// For messages: where objects go.
    fn location(&self) -> String;
}

/// The store named by the settings.
pub fn open(settings: &Settings) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let url = settings.snapshot_store();
    if let Some(dir) = url.strip_prefix("file://") {
        let dir = PathBuf::from(dir);
        anyhow::ensure!(
            dir.is_absolute(),
            "SNAPSHOT_STORE_URL: a file:// store needs an absolute path"
        );
        return Ok(Arc::new(FileStore { dir }));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        anyhow::ensure!(
            !bucket.is_empty(),
            "SNAPSHOT_STORE_URL: s3:// needs a bucket"
        );
        return Ok(Arc::new(S3Store::new(
            settings,
            bucket,
            prefix.trim_end_matches('/'),
        )?));
    }
    bail!("SNAPSHOT_STORE_URL must be file:///<dir> or s3://<bucket>/<prefix>")
}

#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    fn path(&self, key: &str) -> anyhow::Result<PathBuf> {
        // Keys are made by berth, but never let one climb out of the folder.
        anyhow::ensure!(
            !key.split('/')
                .any(|p| p.is_empty() || p == "." || p == ".."),
            "object key {key:?} is not a plain relative path"
        );
        Ok(self.dir.join(key))
    }
}

#[async_trait]
impl ObjectStore for FileStore {
    async fn put(&self, key: &str, mut parts: mpsc::Receiver<Part>) -> anyhow::Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a folder").to_path_buf();
        tokio::fs::create_dir_all(&dir)
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
        let partial = path.with_extension("partial");
        let mut file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("creating {}", partial.display()))?;
        let mut ended = false;
        while let Some(part) = parts.recv().await {
            match part {
                Part::Data(bytes) => file
                    .write_all(&bytes)
                    .await
                    .context("writing the snapshot file")?,
                Part::End => {
                    ended = true;
                    break;
                }
            }
        }
        if !ended {
            drop(file);
            let _ = tokio::fs::remove_file(&partial).await;
            bail!("the snapshot stream ended early; nothing was stored");
        }
        file.sync_all().await.context("syncing the snapshot file")?;
        drop(file);
        tokio::fs::rename(&partial, &path)
            .await
            .context("publishing the snapshot file")?;
        Ok(())
    }

    async fn get(&self, key: &str) -> anyhow::Result<Option<(ObjectReader, u64)>> {
        let path = self.path(key)?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => {
                let size = file.metadata().await?.len();
                Ok(Some((Box::pin(file), size)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
        }
    }

    async fn delete(&self, key: &str) -> anyhow::Result<()> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    fn location(&self) -> String {
        format!("file://{}", self.dir.display())
    }
}

/// Parts of a multipart upload (S3 wants at least 5 MiB for all but the last).
pub const PART_SIZE: usize = 8 << 20;

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Store(s3://{}/{})", self.bucket, self.prefix)
    }
}

impl S3Store {
    fn new(settings: &Settings, bucket: &str, prefix: &str) -> anyhow::Result<Self> {
        let region = settings
            .snapshot_s3_region
            .clone()
            .or_else(|| settings.aws_region.clone())
            .unwrap_or_else(|| "us-east-1".into());
        let client = match (
            &settings.snapshot_s3_endpoint,
            &settings.snapshot_s3_access_key,
            &settings.snapshot_s3_secret_key,
        ) {
            (Some(endpoint), Some(key), Some(secret)) => {
                let credentials = aws::static_credentials(key.expose_secret(), secret, None);
                aws_sdk_s3::Client::from_conf(aws::compatible_s3_config(
                    endpoint,
                    &region,
                    credentials,
                ))
            }
            (None, None, None) => {
                let sdk = aws::sdk_config(settings, &region)?;
                aws_sdk_s3::Client::from_conf(aws::s3_config(&sdk, settings))
            }
            _ => bail!(
                "SNAPSHOT_S3_ENDPOINT, SNAPSHOT_S3_ACCESS_KEY and SNAPSHOT_S3_SECRET_KEY go together"
            ),
        };
        Ok(Self {
            client,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    async fn ensure_bucket(&self) -> anyhow::Result<()> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        let created = self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await;
        aws::errors::tolerate_codes(created, &["BucketAlreadyOwnedByYou", "BucketAlreadyExists"])
            .map(|_| ())
            .map_err(|e| {
                anyhow::anyhow!(
                    "creating the snapshot bucket {}: {}",
                    self.bucket,
                    describe(&e)
                )
            })
    }

    /// Uploads from the second part on; the caller holds the first.
    async fn multipart(
        &self,
        key: &str,
        first: Bytes,
        parts: &mut mpsc::Receiver<Part>,
    ) -> anyhow::Result<()> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("starting the snapshot upload: {}", describe(&e)))?;
        let upload_id = created
            .upload_id()
            .context("the store gave no upload id")?
            .to_string();
        let result = self.upload_parts(key, &upload_id, first, parts).await;
        if result.is_err() {
            // Incomplete uploads are invisible but cost storage: abort, best effort.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        first: Bytes,
        parts: &mut mpsc::Receiver<Part>,
    ) -> anyhow::Result<()> {
        let mut done = Vec::new();
        let mut next = Some(first);
        let mut number = 1;
        let mut ended = false;
        while let Some(body) = next.take() {
            let sent = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!("uploading part {number} of the snapshot: {}", describe(&e))
                })?;
            done.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(sent.e_tag().map(str::to_string))
                    .build(),
            );
            number += 1;
            match parts.recv().await {
                Some(Part::Data(bytes)) => next = Some(bytes),
                Some(Part::End) => ended = true,
                None => {}
            }
        }
        anyhow::ensure!(
            ended,
            "the snapshot stream ended early; the upload was abandoned"
        );
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("completing the snapshot upload: {}", describe(&e)))?;
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, mut parts: mpsc::Receiver<Part>) -> anyhow::Result<()> {
        self.ensure_bucket().await?;
        let key = self.key(key);
        let first = match parts.recv().await {
            Some(Part::Data(bytes)) => bytes,
            Some(Part::End) => Bytes::new(),
            None => bail!("the snapshot stream ended early; nothing was stored"),
        };
        if first.len() < PART_SIZE {
            // The whole object fits in one part: a plain PUT, once the producer confirms the end.
            match parts.recv().await {
                Some(Part::End) => {}
                Some(Part::Data(more)) => {
                    let mut joined = first.to_vec();
                    joined.extend_from_slice(&more);
                    return self.multipart(&key, Bytes::from(joined), &mut parts).await;
                }
                None => bail!("the snapshot stream ended early; nothing was stored"),
            }
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .body(ByteStream::from(first))
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("storing the snapshot: {}", describe(&e)))?;
            return Ok(());
        }
        self.multipart(&key, first, &mut parts).await
    }

    async fn get(&self, key: &str) -> anyhow::Result<Option<(ObjectReader, u64)>> {
        let key = self.key(key);
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(out) => {
                let size = out.content_length().unwrap_or_default().max(0) as u64;
                Ok(Some((Box::pin(out.body.into_async_read()), size)))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(anyhow::anyhow!(
                "reading the snapshot object: {}",
                describe(&e)
            )),
        }
    }

    async fn delete(&self, key: &str) -> anyhow::Result<()> {
        let key = self.key(key);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("deleting the snapshot object: {}", describe(&e)))?;
        Ok(())
    }

    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}
