//! The `s3` engine: a bucket per instance and an IAM user per binding, on AWS (the SDK's standard chain, or
//! any endpoint in `AWS_ENDPOINT_URL`) or on an S3-compatible store (`S3_COMPATIBLE_*`; per-binding users
//! when it has an IAM-style API at `S3_COMPATIBLE_IAM_ENDPOINT`, else bindings share the configured keys).
//! Names are derived from OSB ids (`broker::names`), so a retry finds what the first try made.

mod bucket;
pub mod errors;
mod iam;

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use broker::{
    config::{S3Backend, Settings},
    db::{bindings::BindingRow, instances::InstanceRow},
    model::UpdatePayload,
    names,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

pub use bucket::BucketSpec;

use super::{
    Bound, Progress, Provider, Provisioned,
    aws::{
        self,
        errors::{ProvideErrorMetadata, SdkError, code},
        http_client, static_credentials,
    },
};
use crate::{context::TaskContext, registry::TaskError};

/// The plan engine this provider serves.
pub const ENGINE: &str = "s3";

/// How long a bind waits for a new key to be accepted before it retries the whole bind.
const KEY_PROPAGATION_LIMIT: Duration = Duration::from_secs(30);

/// Facts about the store that shape requests and messages.
#[derive(Debug, Clone)]
pub struct Store {
    pub is_aws: bool,
    pub label: &'static str,
    pub kms_key_id: Option<String>,
}

impl Store {
    pub fn classify<E>(&self, err: SdkError<E>, what: &str) -> TaskError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        errors::classify(err, what, self.label)
    }
}

pub struct S3Provider {
    store: Store,
    s3: aws_sdk_s3::Config,
    /// `None`: the store has no identity API; bindings get `shared_keys`.
    iam: Option<aws_sdk_iam::Client>,
    shared_keys: Option<(String, SecretString)>,
    default_region: String,
    /// What apps are told as `S3_ENDPOINT` (empty on AWS).
    public_endpoint: String,
}

impl std::fmt::Debug for S3Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Provider")
            .field("store", &self.store.label)
            .field("region", &self.default_region)
            .field("endpoint", &self.public_endpoint)
            .finish_non_exhaustive()
    }
}

impl S3Provider {
    /// Sets up clients for the configured store. Credentials are resolved lazily (on the first request), so a
    /// worker starts even while an instance role is still arriving.
    pub fn new(settings: &Settings, backend: S3Backend) -> anyhow::Result<Self> {
        match backend {
            S3Backend::Aws => Self::aws(settings),
            S3Backend::Compatible => Self::compatible(settings),
        }
    }

    fn aws(settings: &Settings) -> anyhow::Result<Self> {
        let region = settings
            .aws_region
            .clone()
            .ok_or_else(|| anyhow::anyhow!("AWS_REGION is required for S3"))?;
        let sdk = aws::sdk_config(settings, &region)?;
        let s3 = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(settings.aws_endpoint_url.is_some())
            .build();
        Ok(Self {
            store: Store {
                is_aws: true,
                label: "AWS",
                kms_key_id: settings.s3_kms_key_id.clone(),
            },
            s3,
            iam: Some(aws_sdk_iam::Client::new(&sdk)),
            shared_keys: None,
            default_region: region,
            public_endpoint: settings.aws_endpoint_url.clone().unwrap_or_default(),
        })
    }

    fn compatible(settings: &Settings) -> anyhow::Result<Self> {
        let (Some(endpoint), Some(key), Some(secret)) = (
            &settings.s3_compatible_endpoint,
            &settings.s3_compatible_access_key,
            &settings.s3_compatible_secret_key,
        ) else {
            anyhow::bail!(
                "S3_COMPATIBLE_ENDPOINT, S3_COMPATIBLE_ACCESS_KEY and S3_COMPATIBLE_SECRET_KEY are required"
            );
        };
        url::Url::parse(endpoint)
            .map_err(|_| anyhow::anyhow!("S3_COMPATIBLE_ENDPOINT is not a URL"))?;
        let credentials = static_credentials(key.expose_secret(), secret, None);
        let region = Region::new(settings.s3_compatible_region.clone());
        let s3 = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http_client())
            .region(region.clone())
            .credentials_provider(credentials.clone())
            .endpoint_url(endpoint)
            .force_path_style(true)
            .build();
        let iam = settings
            .s3_compatible_iam_endpoint
            .as_ref()
            .map(|iam_endpoint| {
                let config = aws_sdk_iam::config::Builder::new()
                    .behavior_version(BehaviorVersion::latest())
                    .http_client(http_client())
                    .region(region.clone())
                    .credentials_provider(credentials.clone())
                    .endpoint_url(iam_endpoint)
                    .build();
                aws_sdk_iam::Client::from_conf(config)
            });
        let shared_keys = iam
            .is_none()
            .then(|| (key.expose_secret().to_string(), secret.clone()));
        Ok(Self {
            store: Store {
                is_aws: false,
                label: "the S3-compatible store",
                kms_key_id: settings.s3_kms_key_id.clone(),
            },
            s3,
            iam,
            shared_keys,
            default_region: settings.s3_compatible_region.clone(),
            public_endpoint: endpoint.clone(),
        })
    }

    /// An S3 client for the bucket's region.
    fn s3(&self, region: &str) -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(
            self.s3
                .to_builder()
                .region(Region::new(region.to_string()))
                .build(),
        )
    }

    fn region_of(&self, instance: &InstanceRow) -> String {
        instance
            .parameters
            .get("region")
            .and_then(Value::as_str)
            .map_or_else(|| self.default_region.clone(), str::to_string)
    }

    fn spec(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        plan_id: &str,
        parameters: &Value,
        context: &Value,
    ) -> Result<BucketSpec, TaskError> {
        let plan = ctx.services.catalog.plan_by_id(plan_id).ok_or_else(|| {
            TaskError::fatal(format!("plan {plan_id:?} is not in this worker's catalog"))
        })?;
        let mut tags = vec![("berth:instance".to_string(), instance.id.clone())];
        let from_context = |key: &str| context.get(key).and_then(Value::as_str).map(str::to_string);
        if let Some(ns) = from_context("namespace") {
            tags.push(("berth:namespace".into(), ns));
        }
        let org =
            from_context("organization_guid").unwrap_or_else(|| instance.organization_guid.clone());
        let space = from_context("space_guid").unwrap_or_else(|| instance.space_guid.clone());
        if !org.is_empty() {
            tags.push(("berth:organization".into(), org));
        }
        if !space.is_empty() {
            tags.push(("berth:space".into(), space));
        }
        tags.extend(aws::extra_tags(parameters)?);
        Ok(BucketSpec {
            versioning: plan.has_feature("versioning"),
            encryption: plan.has_feature("encryption"),
            public_read: parameters
                .get("public_read")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            cors: parameters.get("cors").and_then(Value::as_array).cloned(),
            lifecycle: parameters.get("lifecycle").cloned().unwrap_or(Value::Null),
            tags,
        })
    }

    fn bucket(ctx: &TaskContext<'_>, instance_id: &str) -> String {
        names::bucket_name(ctx.services.name_prefix(), instance_id)
    }

    fn iam_or_none(&self) -> Option<&aws_sdk_iam::Client> {
        self.iam.as_ref()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    ReadOnly,
}

impl Access {
    /// Strict, like the Postgres engines: the catalog's bind schema only lets these two strings through, so an
    /// `access` of another type can only come from a row written by hand, and is refused rather than guessed.
    fn of(binding: &BindingRow) -> Result<Self, TaskError> {
        match binding.parameters.get("access") {
            None | Some(Value::Null) => Ok(Self::ReadWrite),
            Some(Value::String(s)) if s == "read-write" => Ok(Self::ReadWrite),
            Some(Value::String(s)) if s == "read-only" => Ok(Self::ReadOnly),
            Some(other) => Err(TaskError::fatal(format!(
                "binding parameter `access` must be \"read-write\" or \"read-only\", not {other}"
            ))),
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
        }
    }
}

#[async_trait]
impl Provider for S3Provider {
    async fn provision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError> {
        let bucket = Self::bucket(ctx, &instance.id);
        let region = self.region_of(instance);
        let spec = self.spec(
            ctx,
            instance,
            &instance.plan_id,
            &instance.parameters,
            &instance.context,
        )?;
        let s3 = self.s3(&region);
        bucket::create(&self.store, &s3, &bucket, &region).await?;
        bucket::configure(&self.store, &s3, &bucket, &spec).await?;
        Ok(Progress::Done(Provisioned {
            details: json!({
                "bucket": bucket,
                "region": region,
                "endpoint": self.public_endpoint,
                "versioning": spec.versioning,
                "encryption": spec.encryption.then(|| if self.store.kms_key_id.is_some() { "aws:kms" } else { "AES256" }),
                "per_binding_credentials": self.iam.is_some(),
            }),
            secrets: None,
        }))
    }

    async fn update(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        update: &UpdatePayload,
    ) -> Result<Progress<()>, TaskError> {
        let bucket = Self::bucket(ctx, &instance.id);
        let region = self.region_of(instance);
        let spec = self.spec(
            ctx,
            instance,
            &update.plan_id,
            &update.parameters,
            &update.context,
        )?;
        let s3 = self.s3(&region);
        if !bucket::exists(&self.store, &s3, &bucket).await? {
            return Err(TaskError::fatal(format!(
                "the instance's bucket {bucket} does not exist; deprovision the instance and provision it again"
            )));
        }
        bucket::configure(&self.store, &s3, &bucket, &spec).await?;
        Ok(Progress::Done(()))
    }

    async fn deprovision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        bindings: &[BindingRow],
    ) -> Result<Progress<()>, TaskError> {
        let bucket = Self::bucket(ctx, &instance.id);
        let prefix = ctx.services.name_prefix();
        // Revoke every app first, so nothing writes while the bucket is emptied.
        if let Some(iam) = self.iam_or_none() {
            let mut users: Vec<String> = bindings
                .iter()
                .map(|b| names::binding_user(prefix, &b.id))
                .collect();
            for user in iam::users_of_bucket(&self.store, iam, &bucket).await? {
                if !users.contains(&user) {
                    users.push(user);
                }
            }
            for user in &users {
                iam::delete_user(&self.store, iam, user).await?;
            }
        }
        let s3 = self.s3(&self.region_of(instance));
        if bucket::exists(&self.store, &s3, &bucket).await? {
            // Versioning can only be turned on by a plan with it, and never off: a plan without it means a bucket
            // berth never versioned.
            let versioned = ctx
                .services
                .catalog
                .plan_by_id(&instance.plan_id)
                .is_none_or(|p| p.has_feature("versioning"));
            let deleted = bucket::empty(ctx, &self.store, &s3, &bucket, versioned).await?;
            tracing::info!(bucket, deleted, "emptied the bucket");
            bucket::delete(&self.store, &s3, &bucket).await?;
        }
        Ok(Progress::Done(()))
    }

    async fn bind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<Bound>, TaskError> {
        let access = Access::of(binding)?;
        let bucket = Self::bucket(ctx, &instance.id);
        let region = self.region_of(instance);
        let s3 = self.s3(&region);
        if !bucket::exists(&self.store, &s3, &bucket).await? {
            return Err(TaskError::fatal(format!(
                "the instance's bucket {bucket} is missing (did provisioning fail?); deprovision the instance and \
                 provision it again"
            )));
        }
        let user = names::binding_user(ctx.services.name_prefix(), &binding.id);
        let (key_id, secret) = match (&self.iam, &self.shared_keys) {
            (Some(iam), _) => {
                let key = iam::ensure_binding_user(
                    &self.store,
                    iam,
                    &user,
                    &bucket,
                    access == Access::ReadOnly,
                )
                .await?;
                self.wait_until_key_works(&region, &bucket, &key).await?;
                (key.id, key.secret)
            }
            (None, Some((id, secret))) => (id.clone(), secret.clone()),
            (None, None) => {
                return Err(TaskError::fatal(
                    "the S3 store has neither an identity API nor shared keys",
                ));
            }
        };
        Ok(Progress::Done(Bound {
            details: json!({
                "endpoints": [self.endpoint(&region)],
                "bucket": bucket,
                "user": self.iam.is_some().then_some(user),
                "access": access.as_str(),
            }),
            credentials: self.credentials(&bucket, &region, &key_id, &secret),
        }))
    }

    async fn rotate_binding(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
        current: &Map<String, Value>,
    ) -> Result<Progress<Bound>, TaskError> {
        let (iam, user) = self.rotation_user(ctx, binding)?;
        let current_key = access_key_of(current, binding, "stored")?;
        let bucket = Self::bucket(ctx, &instance.id);
        let region = self.region_of(instance);
        // A key an earlier, interrupted try made was never stored: nobody has it.
        iam::delete_keys_except(&self.store, iam, &user, Some(current_key)).await?;
        let key = iam::create_key(&self.store, iam, &user).await?;
        self.wait_until_key_works(&region, &bucket, &key).await?;
        let mut details = binding.details.clone();
        if let Some(map) = details.as_object_mut() {
            map.insert("rotated_at".into(), json!(chrono::Utc::now().to_rfc3339()));
        }
        Ok(Progress::Done(Bound {
            details,
            credentials: self.credentials(&bucket, &region, &key.id, &key.secret),
        }))
    }

    async fn revoke_other_credentials(
        &self,
        ctx: &TaskContext<'_>,
        _instance: &InstanceRow,
        binding: &BindingRow,
        current: &Map<String, Value>,
    ) -> Result<Progress<()>, TaskError> {
        let (iam, user) = self.rotation_user(ctx, binding)?;
        let keep = access_key_of(current, binding, "new")?;
        iam::delete_keys_except(&self.store, iam, &user, Some(keep)).await?;
        Ok(Progress::Done(()))
    }

    async fn unbind(
        &self,
        ctx: &TaskContext<'_>,
        _instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<()>, TaskError> {
        if let Some(iam) = &self.iam {
            let user = names::binding_user(ctx.services.name_prefix(), &binding.id);
            iam::delete_user(&self.store, iam, &user).await?;
        }
        Ok(Progress::Done(()))
    }
}

impl S3Provider {
    /// Waits (bounded) until a new key is accepted for the bucket: IAM is eventually consistent, and a key
    /// handed to an app must work at once.
    async fn wait_until_key_works(
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
    fn rotation_user(
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
    fn endpoint(&self, region: &str) -> Value {
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

    fn credentials(
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
fn access_key_of<'a>(
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
