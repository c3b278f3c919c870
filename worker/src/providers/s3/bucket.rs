//! Bucket operations: create, configure (tags, public access, versioning, lifecycle, encryption, CORS),
//! empty and delete. Each checks or tolerates what exists, so a retry after a crash finishes the job.

use aws_sdk_s3::{
    Client,
    types::{
        AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, BucketLocationConstraint,
        BucketVersioningStatus, CorsConfiguration, CorsRule, CreateBucketConfiguration, Delete,
        ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
        NoncurrentVersionExpiration, NoncurrentVersionTransition, ObjectIdentifier,
        PublicAccessBlockConfiguration, ServerSideEncryption, ServerSideEncryptionByDefault,
        ServerSideEncryptionConfiguration, ServerSideEncryptionRule, Tag, Tagging,
        TransitionStorageClass, VersioningConfiguration,
    },
};
use serde_json::{Value, json};

use super::Store;
use crate::{
    context::TaskContext,
    providers::aws::errors::{ProvideErrorMetadata, SdkError, code, tolerate_codes},
    registry::TaskError,
};

/// What a plan and its parameters ask of a bucket.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    pub versioning: bool,
    pub encryption: bool,
    pub public_read: bool,
    pub cors: Option<Vec<Value>>,
    pub lifecycle: Value,
    pub tags: Vec<(String, String)>,
}

fn build_err(what: &str) -> impl Fn(aws_sdk_s3::error::BuildError) -> TaskError + '_ {
    move |e| TaskError::fatal(format!("{what}: {e}"))
}

/// Creates the bucket unless this account has it already.
pub async fn create(
    store: &Store,
    s3: &Client,
    bucket: &str,
    region: &str,
) -> Result<(), TaskError> {
    let mut request = s3.create_bucket().bucket(bucket);
    // us-east-1 takes no location constraint (it refuses one); every other region needs it.
    if region != "us-east-1" {
        request = request.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(region))
                .build(),
        );
    }
    store.tolerate(
        request.send().await,
        &["BucketAlreadyOwnedByYou"],
        "creating the bucket",
    )?;
    Ok(())
}

/// Applies tags, public access, versioning, lifecycle, encryption and CORS. Turning versioning or encryption
/// on is all an update can do to them (the API refuses plan changes that would turn them off). Each step sets
/// the whole of its setting, so a run after a crash simply does them all again.
pub async fn configure(
    store: &Store,
    s3: &Client,
    bucket: &str,
    spec: &BucketSpec,
) -> Result<(), TaskError> {
    set_tags(store, s3, bucket, &spec.tags).await?;
    if spec.public_read {
        allow_public_reads(store, s3, bucket).await?;
    } else {
        block_public_access(store, s3, bucket).await?;
    }
    if spec.versioning {
        turn_versioning_on(store, s3, bucket).await?;
    }
    if let Some(rule) = lifecycle_rule(spec, store.is_aws)? {
        set_lifecycle(store, s3, bucket, rule).await?;
    }
    if spec.encryption {
        turn_encryption_on(store, s3, bucket).await?;
    }
    match spec.cors.as_deref() {
        Some([]) => remove_cors(store, s3, bucket).await,
        Some(rules) => set_cors(store, s3, bucket, rules).await,
        None => Ok(()),
    }
}

async fn set_tags(
    store: &Store,
    s3: &Client,
    bucket: &str,
    pairs: &[(String, String)],
) -> Result<(), TaskError> {
    let mut tags = Vec::new();
    for (k, v) in pairs {
        tags.push(
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(build_err("building a bucket tag"))?,
        );
    }
    let tagging = Tagging::builder()
        .set_tag_set(Some(tags))
        .build()
        .map_err(build_err("building the tags"))?;
    s3.put_bucket_tagging()
        .bucket(bucket)
        .tagging(tagging)
        .send()
        .await
        .map_err(|e| store.classify(e, "tagging the bucket"))?;
    Ok(())
}

/// Lifts the public-access block and lets anyone read the bucket's objects.
async fn allow_public_reads(store: &Store, s3: &Client, bucket: &str) -> Result<(), TaskError> {
    let lifted = s3.delete_public_access_block().bucket(bucket).send().await;
    tolerate_unsupported(lifted, store, "lifting the bucket's public-access block")?;
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{ "Sid": "BerthPublicRead", "Effect": "Allow", "Principal": "*",
                        "Action": "s3:GetObject", "Resource": format!("arn:aws:s3:::{bucket}/*") }]
    });
    s3.put_bucket_policy()
        .bucket(bucket)
        .policy(policy.to_string())
        .send()
        .await
        .map_err(|e| store.classify(e, "making the bucket's objects publicly readable"))?;
    Ok(())
}

/// Removes the public-read policy and blocks public access.
async fn block_public_access(store: &Store, s3: &Client, bucket: &str) -> Result<(), TaskError> {
    store.tolerate(
        s3.delete_bucket_policy().bucket(bucket).send().await,
        &["NoSuchBucketPolicy", "NotImplemented"],
        "removing the bucket's public-read policy",
    )?;
    let block = PublicAccessBlockConfiguration::builder()
        .block_public_acls(true)
        .ignore_public_acls(true)
        .block_public_policy(true)
        .restrict_public_buckets(true)
        .build();
    let blocked = s3
        .put_public_access_block()
        .bucket(bucket)
        .public_access_block_configuration(block)
        .send()
        .await;
    tolerate_unsupported(blocked, store, "blocking public access to the bucket")
}

async fn turn_versioning_on(store: &Store, s3: &Client, bucket: &str) -> Result<(), TaskError> {
    let enabled = VersioningConfiguration::builder()
        .status(BucketVersioningStatus::Enabled)
        .build();
    s3.put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(enabled)
        .send()
        .await
        .map_err(|e| store.classify(e, "turning versioning on"))?;
    Ok(())
}

async fn set_lifecycle(
    store: &Store,
    s3: &Client,
    bucket: &str,
    rule: LifecycleRule,
) -> Result<(), TaskError> {
    let config = BucketLifecycleConfiguration::builder()
        .rules(rule)
        .build()
        .map_err(build_err("building the lifecycle"))?;
    s3.put_bucket_lifecycle_configuration()
        .bucket(bucket)
        .lifecycle_configuration(config)
        .send()
        .await
        .map_err(|e| store.classify(e, "setting the bucket's lifecycle"))?;
    Ok(())
}

/// Default encryption with the configured KMS key, else with S3's own keys (AES256).
async fn turn_encryption_on(store: &Store, s3: &Client, bucket: &str) -> Result<(), TaskError> {
    let default = match &store.kms_key_id {
        Some(key) => ServerSideEncryptionByDefault::builder()
            .sse_algorithm(ServerSideEncryption::AwsKms)
            .kms_master_key_id(key),
        None => {
            ServerSideEncryptionByDefault::builder().sse_algorithm(ServerSideEncryption::Aes256)
        }
    }
    .build()
    .map_err(build_err("building the encryption settings"))?;
    let rule = ServerSideEncryptionRule::builder()
        .apply_server_side_encryption_by_default(default)
        .bucket_key_enabled(store.kms_key_id.is_some())
        .build();
    let config = ServerSideEncryptionConfiguration::builder()
        .rules(rule)
        .build()
        .map_err(build_err("building the encryption settings"))?;
    s3.put_bucket_encryption()
        .bucket(bucket)
        .server_side_encryption_configuration(config)
        .send()
        .await
        .map_err(|e| store.classify(e, "turning server-side encryption on"))?;
    Ok(())
}

async fn set_cors(
    store: &Store,
    s3: &Client,
    bucket: &str,
    rules: &[Value],
) -> Result<(), TaskError> {
    let rules = rules.iter().map(cors_rule).collect::<Result<Vec<_>, _>>()?;
    let config = CorsConfiguration::builder()
        .set_cors_rules(Some(rules))
        .build()
        .map_err(build_err("building the CORS rules"))?;
    s3.put_bucket_cors()
        .bucket(bucket)
        .cors_configuration(config)
        .send()
        .await
        .map_err(|e| store.classify(e, "setting the bucket's CORS rules"))?;
    Ok(())
}

async fn remove_cors(store: &Store, s3: &Client, bucket: &str) -> Result<(), TaskError> {
    s3.delete_bucket_cors()
        .bucket(bucket)
        .send()
        .await
        .map_err(|e| store.classify(e, "removing the bucket's CORS rules"))?;
    Ok(())
}

/// Public-access blocks are an AWS feature; a store without them has nothing to block or lift.
fn tolerate_unsupported<T, E>(
    result: Result<T, SdkError<E>>,
    store: &Store,
    what: &str,
) -> Result<(), TaskError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match tolerate_codes(result, &["NoSuchPublicAccessBlockConfiguration"]) {
        Ok(_) => Ok(()),
        Err(e)
            if !store.is_aws
                && matches!(
                    code(&e).as_deref(),
                    Some("NotImplemented" | "MethodNotAllowed")
                ) =>
        {
            tracing::info!("{what}: the store does not support it; skipped");
            Ok(())
        }
        Err(e) => Err(store.classify(e, what)),
    }
}

fn days(lifecycle: &Value, key: &str) -> Option<i32> {
    lifecycle
        .get(key)
        .and_then(Value::as_i64)
        .and_then(|d| i32::try_from(d).ok())
}

/// The versioned plans' rule (noncurrent versions to STANDARD_IA after 30 days, expired after 180), with the
/// `lifecycle` parameter's overrides; unversioned buckets get a rule only when the parameter asks for one.
/// Stores other than AWS have no storage classes to move versions to (SeaweedFS answers NotImplemented), so
/// there the rule only expires them.
fn lifecycle_rule(
    spec: &BucketSpec,
    transitions: bool,
) -> Result<Option<LifecycleRule>, TaskError> {
    let l = &spec.lifecycle;
    let expire = days(l, "expire_days");
    let abort = days(l, "abort_incomplete_multipart_days");
    if !spec.versioning && expire.is_none() && abort.is_none() {
        return Ok(None);
    }
    let mut rule = LifecycleRule::builder()
        .id("berth")
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().prefix("").build())
        .abort_incomplete_multipart_upload(
            AbortIncompleteMultipartUpload::builder()
                .days_after_initiation(abort.unwrap_or(7))
                .build(),
        );
    if spec.versioning && transitions {
        rule = rule.noncurrent_version_transitions(
            NoncurrentVersionTransition::builder()
                .noncurrent_days(days(l, "noncurrent_to_ia_days").unwrap_or(30))
                .storage_class(TransitionStorageClass::StandardIa)
                .build(),
        );
    }
    if spec.versioning {
        rule = rule.noncurrent_version_expiration(
            NoncurrentVersionExpiration::builder()
                .noncurrent_days(days(l, "noncurrent_expire_days").unwrap_or(180))
                .build(),
        );
    }
    if let Some(d) = expire {
        rule = rule.expiration(LifecycleExpiration::builder().days(d).build());
    }
    Ok(Some(
        rule.build()
            .map_err(build_err("building the lifecycle rule"))?,
    ))
}

fn strings(rule: &Value, key: &str) -> Option<Vec<String>> {
    rule.get(key).and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    })
}

fn cors_rule(rule: &Value) -> Result<CorsRule, TaskError> {
    CorsRule::builder()
        .set_allowed_methods(strings(rule, "allowed_methods"))
        .set_allowed_origins(strings(rule, "allowed_origins"))
        .set_allowed_headers(strings(rule, "allowed_headers"))
        .set_expose_headers(strings(rule, "expose_headers"))
        .set_max_age_seconds(
            rule.get("max_age_seconds")
                .and_then(Value::as_i64)
                .and_then(|s| i32::try_from(s).ok()),
        )
        .build()
        .map_err(build_err("parameter `cors`"))
}

/// Whether the bucket exists (in this account).
pub async fn exists(store: &Store, s3: &Client, bucket: &str) -> Result<bool, TaskError> {
    let found = store.tolerate(
        s3.head_bucket().bucket(bucket).send().await,
        &["NotFound", "NoSuchBucket"],
        "looking up the bucket",
    )?;
    Ok(found.is_some())
}

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

/// Deletes the (empty) bucket; a bucket that is gone already counts as deleted.
pub async fn delete(store: &Store, s3: &Client, bucket: &str) -> Result<(), TaskError> {
    match tolerate_codes(
        s3.delete_bucket().bucket(bucket).send().await,
        &["NoSuchBucket", "NotFound"],
    ) {
        Ok(_) => Ok(()),
        // Something was written between emptying and deleting (a binding deleted moments ago): go round again.
        Err(e) if code(&e).as_deref() == Some("BucketNotEmpty") => Err(TaskError::retryable(
            "deleting the bucket: it is not empty yet; emptying it again",
        )),
        Err(e) => Err(store.classify(e, "deleting the bucket")),
    }
}
