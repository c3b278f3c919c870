//! Bucket operations: create, configure (tags, public access, versioning, lifecycle, encryption, CORS),
//! empty and delete. Each checks or tolerates what exists, so a retry after a crash finishes the job.

mod emptying;
mod settings;

use aws_sdk_s3::{
    Client,
    types::{BucketLocationConstraint, CreateBucketConfiguration},
};
use serde_json::Value;

use super::Store;
use crate::{
    providers::aws::errors::{code, tolerate_codes},
    registry::TaskError,
};

pub use emptying::empty;
pub use settings::configure;

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

/// Whether the bucket exists (in this account).
pub async fn exists(store: &Store, s3: &Client, bucket: &str) -> Result<bool, TaskError> {
    let found = store.tolerate(
        s3.head_bucket().bucket(bucket).send().await,
        &["NotFound", "NoSuchBucket"],
        "looking up the bucket",
    )?;
    Ok(found.is_some())
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
