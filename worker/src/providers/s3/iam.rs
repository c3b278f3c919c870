//! Per-binding identities: an IAM user per binding, under the path `/berth/<bucket>/` (so deprovision finds
//! every user it made for a bucket, even one whose binding row was lost), one access key and one inline
//! policy scoped to the bucket. Deleting the user revokes exactly that binding.

use std::time::Duration;

use aws_sdk_iam::Client;
use secrecy::SecretString;
use serde_json::json;

use super::Store;
use crate::{
    providers::aws::errors::{code, tolerate_codes},
    registry::TaskError,
};

/// The inline policy's name on every binding user.
const POLICY: &str = "berth-bucket-access";

/// IAM's "no such user (or key, or policy)": gone already.
const NO_SUCH_ENTITY: &str = "NoSuchEntity";

/// The path of every user made for `bucket`.
pub fn user_path(bucket: &str) -> String {
    format!("/berth/{bucket}/")
}

/// The policy of a binding: list/read for read-only, and write/delete for read-write, on this bucket only.
/// The multipart listing actions are AWS's; other stores (SeaweedFS) refuse a policy naming them and cover
/// them with ListBucket and PutObject.
pub fn policy(bucket: &str, read_only: bool, aws: bool) -> String {
    let mut object_actions = vec!["s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectTagging"];
    if !read_only {
        object_actions.extend([
            "s3:PutObject",
            "s3:PutObjectTagging",
            "s3:DeleteObject",
            "s3:DeleteObjectVersion",
            "s3:AbortMultipartUpload",
        ]);
        if aws {
            object_actions.push("s3:ListMultipartUploadParts");
        }
    }
    let mut bucket_actions = vec![
        "s3:ListBucket",
        "s3:ListBucketVersions",
        "s3:GetBucketLocation",
    ];
    if aws {
        bucket_actions.push("s3:ListBucketMultipartUploads");
    }
    json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Sid": "Bucket", "Effect": "Allow",
              "Action": bucket_actions,
              "Resource": [format!("arn:aws:s3:::{bucket}")] },
            { "Sid": "Objects", "Effect": "Allow", "Action": object_actions,
              "Resource": [format!("arn:aws:s3:::{bucket}/*")] }
        ]
    })
    .to_string()
}

/// A fresh access key for the binding's user.
pub struct AccessKey {
    pub id: String,
    pub secret: SecretString,
}

/// Makes (or finds) the user, sets its policy, and gives it one new key. A key left by an earlier try is
/// deleted: its secret was never stored, so nobody can use it.
pub async fn ensure_binding_user(
    store: &Store,
    iam: &Client,
    user: &str,
    bucket: &str,
    read_only: bool,
) -> Result<AccessKey, TaskError> {
    let created = iam
        .create_user()
        .user_name(user)
        .path(user_path(bucket))
        .send()
        .await;
    store.tolerate(
        created,
        &["EntityAlreadyExists"],
        "creating the binding's IAM user",
    )?;
    iam.put_user_policy()
        .user_name(user)
        .policy_name(POLICY)
        .policy_document(policy(bucket, read_only, store.is_aws))
        .send()
        .await
        .map_err(|e| store.classify(e, "giving the binding's user its bucket policy"))?;
    delete_keys(store, iam, user).await?;
    create_key(store, iam, user).await
}

/// A new access key for an existing user (IAM allows two at a time).
pub async fn create_key(store: &Store, iam: &Client, user: &str) -> Result<AccessKey, TaskError> {
    let out = iam
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .map_err(|e| store.classify(e, "creating the binding's access key"))?;
    let key = out.access_key().ok_or_else(|| {
        TaskError::retryable("creating the binding's access key: the answer had no key")
    })?;
    Ok(AccessKey {
        id: key.access_key_id().to_string(),
        secret: SecretString::from(key.secret_access_key()),
    })
}

async fn delete_keys(store: &Store, iam: &Client, user: &str) -> Result<(), TaskError> {
    delete_keys_except(store, iam, user, None).await
}

/// Deletes every key of `user` but `keep`; a user that is gone has none.
pub async fn delete_keys_except(
    store: &Store,
    iam: &Client,
    user: &str,
    keep: Option<&str>,
) -> Result<(), TaskError> {
    let listed = iam.list_access_keys().user_name(user).send().await;
    let Some(keys) =
        store.tolerate(listed, &[NO_SUCH_ENTITY], "listing the binding user's keys")?
    else {
        return Ok(());
    };
    for key in keys.access_key_metadata() {
        let Some(id) = key.access_key_id().filter(|id| Some(*id) != keep) else {
            continue;
        };
        let deleted = iam
            .delete_access_key()
            .user_name(user)
            .access_key_id(id)
            .send()
            .await;
        store.tolerate(deleted, &[NO_SUCH_ENTITY], "deleting a binding user's key")?;
    }
    Ok(())
}

/// Deletes the user with its keys and inline policies; a user that is gone counts as deleted.
pub async fn delete_user(store: &Store, iam: &Client, user: &str) -> Result<(), TaskError> {
    delete_keys(store, iam, user).await?;
    let listed = iam.list_user_policies().user_name(user).send().await;
    let Some(policies) = store.tolerate(
        listed,
        &[NO_SUCH_ENTITY],
        "listing the binding user's policies",
    )?
    else {
        return Ok(());
    };
    for name in policies.policy_names() {
        let deleted = iam
            .delete_user_policy()
            .user_name(user)
            .policy_name(name)
            .send()
            .await;
        store.tolerate(
            deleted,
            &[NO_SUCH_ENTITY],
            "deleting a binding user's policy",
        )?;
    }
    match tolerate_codes(
        iam.delete_user().user_name(user).send().await,
        &[NO_SUCH_ENTITY],
    ) {
        Ok(_) => Ok(()),
        // A key or policy added concurrently (a retried bind): go round again.
        Err(e) if code(&e).as_deref() == Some("DeleteConflict") => Err(TaskError::retryable(
            "deleting the binding's IAM user: it still has a key or policy",
        )),
        Err(e) => Err(store.classify(e, "deleting the binding's IAM user")),
    }
}

/// Users made for `bucket` (by their path).
pub async fn users_of_bucket(
    store: &Store,
    iam: &Client,
    bucket: &str,
) -> Result<Vec<String>, TaskError> {
    let path = user_path(bucket);
    let mut users = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_users()
            .path_prefix(&path)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| store.classify(e, "listing the bucket's IAM users"))?;
        // A store that ignores PathPrefix lists everyone: filter here too.
        users.extend(
            out.users()
                .iter()
                .filter(|u| u.path() == path)
                .map(|u| u.user_name().to_string()),
        );
        match (out.is_truncated(), out.marker()) {
            (true, Some(m)) => marker = Some(m.to_string()),
            _ => return Ok(users),
        }
    }
}

/// Waits, a bounded time, until a new key is accepted: IAM is eventually consistent, and a key handed to an
/// app must work at once. `probe` tries the key (a HEAD of the bucket); `Ok(false)` = not valid yet.
pub async fn wait_until_valid<F, Fut>(mut probe: F, limit: Duration) -> Result<(), TaskError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, TaskError>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(100);
    loop {
        if probe().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Err(TaskError::retryable(format!(
                "the binding's new access key was not accepted within {}s (IAM is slow to propagate); trying again",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}
