//! AWS plumbing shared by the engines that call AWS (`s3`, `ec2`, `ha_ec2`, connection pushes): an HTTPS client
//! on rustls + ring (the SDK's default would build aws-lc), the SDK's standard chain read from berth's settings,
//! the sorting of AWS errors ([`errors`]) and the `tags` parameter every AWS resource takes.

pub mod errors;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::{Credentials, SharedHttpClient};
use broker::config::Settings;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::registry::TaskError;

/// An HTTPS-capable client on rustls + ring.
pub fn http_client() -> SharedHttpClient {
    use aws_smithy_http_client::{Builder, tls};
    Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

pub fn static_credentials(
    key: &str,
    secret: &SecretString,
    token: Option<&SecretString>,
) -> Credentials {
    Credentials::new(
        key,
        secret.expose_secret(),
        token.map(|t| t.expose_secret().to_string()),
        None,
        "berth-settings",
    )
}

/// The SDK configuration of `AWS_*` settings (the standard chain, `AWS_ENDPOINT_URL` included) for `region`.
/// Credentials are resolved lazily (on the first request), so a worker starts even while an instance role is
/// still arriving.
pub fn sdk_config(settings: &Settings, region: &str) -> anyhow::Result<SdkConfig> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client())
        .region(Region::new(region.to_string()));
    if let Some(endpoint) = &settings.aws_endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    if let (Some(key), Some(secret)) =
        (&settings.aws_access_key_id, &settings.aws_secret_access_key)
    {
        loader = loader.credentials_provider(static_credentials(
            key,
            secret,
            settings.aws_session_token.as_ref(),
        ));
    }
    // The loader only resolves settings (no request is made); block on it from sync code.
    block_on(loader.load())
}

/// The S3 configuration of the standard chain (`sdk`, from [`sdk_config`]): bucket names go in the path when
/// `AWS_ENDPOINT_URL` names an endpoint of its own (moto, LocalStack), as such endpoints have no bucket hosts.
pub fn s3_config(sdk: &SdkConfig, settings: &Settings) -> aws_sdk_s3::Config {
    aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(settings.aws_endpoint_url.is_some())
        .build()
}

/// The S3 configuration of an S3-compatible store at `endpoint`, with static keys (bucket names in the path).
pub fn compatible_s3_config(
    endpoint: &str,
    region: &str,
    credentials: Credentials,
) -> aws_sdk_s3::Config {
    aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http_client())
        .region(Region::new(region.to_string()))
        .credentials_provider(credentials)
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build()
}

/// Runs a future to completion from synchronous start-up code, inside or outside a runtime.
pub fn block_on<F: std::future::Future + Send>(future: F) -> anyhow::Result<F::Output>
where
    F::Output: Send,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            Ok(tokio::task::block_in_place(|| handle.block_on(future)))
        }
        _ => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map(|rt| rt.block_on(future))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("loading the AWS settings panicked"))?
                .map_err(anyhow::Error::from)
        }),
    }
}

/// The `tags` parameter: labels for every resource, besides berth's own `berth:*` ones.
pub fn extra_tags(parameters: &Value) -> Result<Vec<(String, String)>, TaskError> {
    let mut tags = Vec::new();
    if let Some(extra) = parameters.get("tags").and_then(Value::as_object) {
        for (k, v) in extra {
            if k.starts_with("berth:") {
                return Err(TaskError::fatal(format!(
                    "tag {k:?}: berth:* tags are berth's own"
                )));
            }
            tags.push((k.clone(), v.as_str().unwrap_or_default().to_string()));
        }
    }
    Ok(tags)
}
