//! Emptying a bucket before it is deleted: object versions, delete markers and unfinished uploads, a batch at a
//! time.

use aws_sdk_s3::{
    Client,
    types::{Delete, ObjectIdentifier},
};

use super::{super::Store, build_err};
use crate::{context::TaskContext, registry::TaskError};

/// Largest batch DeleteObjects takes.
pub const BATCH: i32 = 1000;

/// One listing page as (key, version) pairs: object versions and delete markers, or plain keys. `None`: the
/// bucket is gone.
async fn list_batch(
    store: &Store,
    s3: &Client,
    bucket: &str,
    versions: bool,
) -> Result<Option<Vec<(String, Option<String>)>>, TaskError> {
    if versions {
        list_versions(store, s3, bucket).await
    } else {
        list_keys(store, s3, bucket).await
    }
}

async fn list_versions(
    store: &Store,
    s3: &Client,
    bucket: &str,
) -> Result<Option<Vec<(String, Option<String>)>>, TaskError> {
    let listed = s3
        .list_object_versions()
        .bucket(bucket)
        .max_keys(BATCH)
        .send()
        .await;
    let Some(page) = store.tolerate(
        listed,
        &["NoSuchBucket"],
        "listing the bucket's object versions",
    )?
    else {
        return Ok(None);
    };
    let versions = page.versions().iter().map(|v| (v.key(), v.version_id()));
    let markers = page
        .delete_markers()
        .iter()
        .map(|m| (m.key(), m.version_id()));
    Ok(Some(
        versions
            .chain(markers)
            .filter_map(|(key, version)| Some((key?.to_string(), version.map(str::to_string))))
            .collect(),
    ))
}

async fn list_keys(
    store: &Store,
    s3: &Client,
    bucket: &str,
) -> Result<Option<Vec<(String, Option<String>)>>, TaskError> {
    let listed = s3
        .list_objects_v2()
        .bucket(bucket)
        .max_keys(BATCH)
        .send()
        .await;
    let Some(page) = store.tolerate(listed, &["NoSuchBucket"], "listing the bucket's objects")?
    else {
        return Ok(None);
    };
    Ok(Some(
        page.contents()
            .iter()
            .filter_map(|o| o.key())
            .map(|k| (k.to_string(), None))
            .collect(),
    ))
}

/// Deletes every object version, delete marker and unfinished upload, a batch of at most 1,000 at a time.
/// Each round lists from the start, so a run after a crash simply goes on where the last one stopped. A
/// bucket berth never versioned is listed plainly (cheaper on most stores) and checked for versions once at
/// the end; a versioned one is listed by versions, with a plain listing for stores that list no versions.
pub async fn empty(
    ctx: &TaskContext<'_>,
    store: &Store,
    s3: &Client,
    bucket: &str,
    versioned: bool,
) -> Result<u64, TaskError> {
    let mut deleted: u64 = 0;
    loop {
        if ctx.cancel.is_cancelled() {
            return Err(TaskError::retryable("stopped while emptying the bucket"));
        }
        let Some(mut ids) = list_batch(store, s3, bucket, versioned).await? else {
            return Ok(deleted);
        };
        if ids.is_empty() {
            let Some(other) = list_batch(store, s3, bucket, !versioned).await? else {
                return Ok(deleted);
            };
            ids = other;
        }
        if ids.is_empty() {
            break;
        }
        ids.truncate(BATCH as usize);
        let count = ids.len() as u64;
        delete_batch(store, s3, bucket, ids).await?;
        deleted += count;
        ctx.progress(&format!(
            "emptying the bucket: {deleted} objects and versions deleted so far"
        ))
        .await?;
    }
    abort_uploads(store, s3, bucket).await?;
    Ok(deleted)
}

async fn delete_batch(
    store: &Store,
    s3: &Client,
    bucket: &str,
    ids: Vec<(String, Option<String>)>,
) -> Result<(), TaskError> {
    let mut objects = Vec::with_capacity(ids.len());
    for (key, version) in ids {
        objects.push(
            ObjectIdentifier::builder()
                .key(key)
                .set_version_id(version)
                .build()
                .map_err(build_err("building a delete batch"))?,
        );
    }
    let delete = Delete::builder()
        .set_objects(Some(objects))
        .quiet(true)
        .build()
        .map_err(build_err("building a delete batch"))?;
    let out = s3
        .delete_objects()
        .bucket(bucket)
        .delete(delete)
        .send()
        .await
        .map_err(|e| store.classify(e, "deleting a batch of objects"))?;
    if let Some(first) = out.errors().first() {
        return Err(TaskError::retryable(format!(
            "deleting a batch of objects: {} of them failed, the first with {} ({})",
            out.errors().len(),
            first.code().unwrap_or("no code"),
            first.message().unwrap_or("")
        )));
    }
    Ok(())
}

async fn abort_uploads(store: &Store, s3: &Client, bucket: &str) -> Result<(), TaskError> {
    loop {
        let listed = s3.list_multipart_uploads().bucket(bucket).send().await;
        let Some(page) = store.tolerate(
            listed,
            &["NoSuchBucket", "NotImplemented"],
            "listing unfinished uploads",
        )?
        else {
            return Ok(());
        };
        if page.uploads().is_empty() {
            return Ok(());
        }
        for upload in page.uploads() {
            let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                continue;
            };
            let aborted = s3
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await;
            store.tolerate(aborted, &["NoSuchUpload"], "aborting an unfinished upload")?;
        }
    }
}
