//! The `s3` engine: a bucket per instance and an IAM user per binding, on AWS (the SDK's standard chain, or
//! any endpoint in `AWS_ENDPOINT_URL`) or on an S3-compatible store (`S3_COMPATIBLE_*`; per-binding users
//! when it has an IAM-style API at `S3_COMPATIBLE_IAM_ENDPOINT`, else bindings share the configured keys).
//! Names are derived from OSB ids (`broker::names`), so a retry finds what the first try made.

mod bucket;
mod credentials;
mod errors;
mod iam;
mod store;

use async_trait::async_trait;
use broker::{
    db::{bindings::BindingRow, instances::InstanceRow},
    model::UpdatePayload,
    names,
};
use secrecy::SecretString;
use serde_json::{Map, Value, json};

pub use bucket::BucketSpec;
pub use store::Store;

use self::credentials::access_key_of;
use super::binding_access::Access;
use super::{Bound, Progress, Provider, Provisioned, aws};
use crate::{context::TaskContext, registry::TaskError};

/// The plan engine this provider serves.
pub const ENGINE: &str = "s3";

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

    /// The instance's bucket: the one its details record (a bucket taken from a warm pool keeps the name it was
    /// made with, since buckets cannot be renamed), else the one named after its id.
    fn bucket_of(ctx: &TaskContext<'_>, instance: &InstanceRow) -> String {
        instance
            .details
            .get("bucket")
            .and_then(Value::as_str)
            .map_or_else(|| Self::bucket(ctx, &instance.id), str::to_string)
    }

    /// What the instance's details keep of its bucket.
    fn provisioned(&self, bucket: &str, region: &str, spec: &BucketSpec) -> Provisioned {
        Provisioned {
            details: json!({
                "bucket": bucket,
                "region": region,
                "endpoint": self.public_endpoint,
                "versioning": spec.versioning,
                "encryption": spec.encryption.then(|| if self.store.kms_key_id.is_some() { "aws:kms" } else { "AES256" }),
                "per_binding_credentials": self.iam.is_some(),
            }),
            secrets: None,
        }
    }

    fn iam_or_none(&self) -> Option<&aws_sdk_iam::Client> {
        self.iam.as_ref()
    }
}

#[async_trait]
impl Provider for S3Provider {
    async fn provision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError> {
        let bucket = Self::bucket_of(ctx, instance);
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
        Ok(Progress::Done(self.provisioned(&bucket, &region, &spec)))
    }

    /// A pooled bucket keeps its name (buckets cannot be renamed; the name is berth's, derived from the pool
    /// item's id) and gets the instance's tags and settings. It has no credential to replace: binding users are
    /// made at bind time, and the item had no binding.
    async fn adopt(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        let bucket = Self::bucket_of(ctx, instance);
        let region = self.region_of(instance);
        let spec = self.spec(
            ctx,
            instance,
            &instance.plan_id,
            &instance.parameters,
            &instance.context,
        )?;
        let s3 = self.s3(&region);
        if !bucket::exists(&self.store, &s3, &bucket).await? {
            return Err(TaskError::fatal(format!(
                "the pooled bucket {bucket} is missing; deprovision the instance and provision it again"
            )));
        }
        bucket::configure(&self.store, &s3, &bucket, &spec).await?;
        let mut made = self.provisioned(&bucket, &region, &spec);
        made.details["pool_item"] = json!(pool_item);
        Ok(Progress::Done(made))
    }

    async fn update(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        update: &UpdatePayload,
    ) -> Result<Progress<()>, TaskError> {
        let bucket = Self::bucket_of(ctx, instance);
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
        let bucket = Self::bucket_of(ctx, instance);
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
        let bucket = Self::bucket_of(ctx, instance);
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
        let bucket = Self::bucket_of(ctx, instance);
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
