//! What a binding gets: its access (read-write or read-only), a key proven to work, and the credentials and
//! OSB endpoint handed to the app.

use std::time::Duration;

use aws_sdk_s3::config::Region;
use broker::{db::bindings::BindingRow, names};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use super::{S3Provider, iam};
use crate::{
    context::TaskContext,
    providers::aws::{
        errors::{ProvideErrorMetadata, SdkError, code},
        static_credentials,
    },
    registry::TaskError,
};

/// How long a bind waits for a new key to be accepted before it retries the whole bind.
const KEY_PROPAGATION_LIMIT: Duration = Duration::from_secs(30);

impl S3Provider {
    /// Waits (bounded) until a new key is accepted for the bucket: IAM is eventually consistent, and a key
    /// handed to an app must work at once.
    pub(super) async fn wait_until_key_works(
        &self,
        region: &str,
        bucket: &str,
        key: &iam::AccessKey,
    ) -> Result<(), TaskError> {
        let probe_client = aws_sdk_s3::Client::from_conf(
            self.s3
                .to_builder()
                .region(Region::new(region.to_string()))
                .credentials_provider(static_credentials(&key.id, &key.secret, None))
                .build(),
        );
        let store = &self.store;
        let bucket_name = bucket.to_string();
        iam::wait_until_valid(
            || {
                let client = probe_client.clone();
                let bucket = bucket_name.clone();
                async move {
                    // A one-key listing (s3:ListBucket, which every binding has): HeadBucket is
                    // the same permission on AWS, but moto checks a made-up s3:HeadBucket for it.
                    match client
                        .list_objects_v2()
                        .bucket(&bucket)
                        .max_keys(1)
                        .send()
                        .await
                    {
                        Ok(_) => Ok(true),
                        Err(e) if not_valid_yet(&e) => Ok(false),
                        Err(e) => Err(store.classify(e, "trying the binding's new key")),
                    }
                }
            },
            KEY_PROPAGATION_LIMIT,
        )
        .await
    }

    /// The IAM client and the binding's user, for rotation; a store without an identity API has no
    /// per-binding key to rotate.
    pub(super) fn rotation_user(
        &self,
        ctx: &TaskContext<'_>,
        binding: &BindingRow,
    ) -> Result<(&aws_sdk_iam::Client, String), TaskError> {
        let iam = self.iam.as_ref().ok_or_else(|| {
            TaskError::fatal(
                "this plan cannot rotate credentials: bindings share the store's keys (set S3_COMPATIBLE_IAM_ENDPOINT \
                 for per-binding keys)",
            )
        })?;
        Ok((
            iam,
            names::binding_user(ctx.services.name_prefix(), &binding.id),
        ))
    }

    /// The OSB `endpoints` entry for the bucket's region.
    pub(super) fn endpoint(&self, region: &str) -> Value {
        match url::Url::parse(&self.public_endpoint) {
            Ok(url) => json!({
                "host": url.host_str().unwrap_or_default(),
                "ports": [url.port_or_known_default().unwrap_or(443).to_string()],
                "protocol": "tcp",
            }),
            Err(_) => {
                json!({ "host": format!("s3.{region}.amazonaws.com"), "ports": ["443"], "protocol": "tcp" })
            }
        }
    }

    pub(super) fn credentials(
        &self,
        bucket: &str,
        region: &str,
        key_id: &str,
        secret: &SecretString,
    ) -> Map<String, Value> {
        let mut uri = url::Url::parse("s3://bucket").expect("static URL");
        let _ = uri.set_host(Some(bucket));
        let _ = uri.set_username(key_id);
        let _ = uri.set_password(Some(secret.expose_secret()));
        uri.query_pairs_mut().append_pair("region", region);
        if !self.public_endpoint.is_empty() {
            uri.query_pairs_mut()
                .append_pair("endpoint", &self.public_endpoint);
        }
        let mut c = Map::new();
        c.insert("S3_BUCKET".into(), json!(bucket));
        c.insert("S3_LOCATION".into(), json!(format!("s3://{bucket}")));
        c.insert("S3_ACCESS_KEY".into(), json!(key_id));
        c.insert("S3_SECRET_KEY".into(), json!(secret.expose_secret()));
        c.insert("S3_REGION".into(), json!(region));
        c.insert("S3_ENDPOINT".into(), json!(self.public_endpoint));
        c.insert("uri".into(), json!(String::from(uri)));
        c
    }
}

/// The access key in a binding's `credentials` (`which`: "stored", "new", for the message).
pub(super) fn access_key_of<'a>(
    credentials: &'a Map<String, Value>,
    binding: &BindingRow,
    which: &str,
) -> Result<&'a str, TaskError> {
    credentials
        .get("S3_ACCESS_KEY")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            TaskError::fatal(format!(
                "binding {}: its {which} credentials have no S3_ACCESS_KEY",
                binding.id
            ))
        })
}

/// A new key refused as unknown, or known but its policy not yet in force: IAM has not caught up yet.
fn not_valid_yet<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    match err {
        SdkError::ServiceError(service) => {
            matches!(
                code(err).as_deref(),
                Some("InvalidAccessKeyId" | "AccessDenied" | "Forbidden" | "SignatureDoesNotMatch")
            ) || service.raw().status().as_u16() == 403
        }
        _ => false,
    }
}
