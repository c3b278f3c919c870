//! A bucket's settings, each set whole by a step of its own: tags, public access, versioning, lifecycle,
//! encryption and CORS.

use aws_sdk_s3::{
    Client,
    types::{
        AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, BucketVersioningStatus,
        CorsConfiguration, CorsRule, ExpirationStatus, LifecycleExpiration, LifecycleRule,
        LifecycleRuleFilter, NoncurrentVersionExpiration, NoncurrentVersionTransition,
        PublicAccessBlockConfiguration, ServerSideEncryption, ServerSideEncryptionByDefault,
        ServerSideEncryptionConfiguration, ServerSideEncryptionRule, Tag, Tagging,
        TransitionStorageClass, VersioningConfiguration,
    },
};
use serde_json::{Value, json};

use super::{super::Store, BucketSpec, build_err};
use crate::{
    providers::aws::errors::{SdkError, ServiceError, code, tolerate_codes},
    registry::TaskError,
};

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
fn tolerate_unsupported<T, E: ServiceError>(
    result: Result<T, SdkError<E>>,
    store: &Store,
    what: &str,
) -> Result<(), TaskError> {
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
