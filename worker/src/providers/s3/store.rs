//! The store berth keeps buckets on: AWS (the SDK's standard chain, or `AWS_ENDPOINT_URL`) or an S3-compatible
//! one (`S3_COMPATIBLE_*`), its clients, and the facts about it that shape requests and messages.

use aws_sdk_s3::config::{BehaviorVersion, Region};
use broker::config::{S3Backend, Settings};
use secrecy::ExposeSecret;

use super::{S3Provider, errors};
use crate::{
    providers::aws::{
        self,
        errors::{SdkError, ServiceError},
        http_client, static_credentials,
    },
    registry::TaskError,
};

/// Facts about the store that shape requests and messages.
#[derive(Debug, Clone)]
pub struct Store {
    pub is_aws: bool,
    pub label: &'static str,
    pub kms_key_id: Option<String>,
}

impl Store {
    pub fn classify<E: ServiceError>(&self, err: SdkError<E>, what: &str) -> TaskError {
        errors::classify(err, what, self.label)
    }

    /// `result`, with the errors whose code is one of `fine` read as `Ok(None)` ("already so") and the others
    /// classified as met while doing `what`.
    pub fn tolerate<T, E: ServiceError>(
        &self,
        result: Result<T, SdkError<E>>,
        fine: &[&str],
        what: &str,
    ) -> Result<Option<T>, TaskError> {
        aws::errors::tolerate_codes(result, fine).map_err(|e| self.classify(e, what))
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
        let s3 = aws::s3_config(&sdk, settings);
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
        let s3 = aws::compatible_s3_config(
            endpoint,
            &settings.s3_compatible_region,
            credentials.clone(),
        );
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
    pub(super) fn s3(&self, region: &str) -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(
            self.s3
                .to_builder()
                .region(Region::new(region.to_string()))
                .build(),
        )
    }
}
