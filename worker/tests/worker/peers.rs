//! The S3/AWS peers `scripts/test.sh` starts (moto: AWS S3, IAM and EC2, with IAM enforced; SeaweedFS: an
//! S3-compatible store with an IAM-style API) and SDK clients for them. Without their variables the tests
//! that need them fail: they are never skipped silently.

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::{Builder, tls};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run ./scripts/test.sh, which starts moto and SeaweedFS and sets it"
        )
    })
}

/// A peer's URL and its admin keys.
pub struct Peer {
    pub url: String,
    pub key: String,
    pub secret: String,
}

pub fn moto() -> Peer {
    Peer {
        url: env("BERTH_TEST_MOTO_URL"),
        key: env("BERTH_TEST_MOTO_ACCESS_KEY"),
        secret: env("BERTH_TEST_MOTO_SECRET_KEY"),
    }
}

pub fn seaweed() -> Peer {
    Peer {
        url: env("BERTH_TEST_S3_COMPAT_URL"),
        key: env("BERTH_TEST_S3_COMPAT_ACCESS_KEY"),
        secret: env("BERTH_TEST_S3_COMPAT_SECRET_KEY"),
    }
}

fn http_client() -> aws_sdk_s3::config::SharedHttpClient {
    Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

fn credentials(key: &str, secret: &str) -> Credentials {
    Credentials::new(key, secret, None, None, "test")
}

/// An S3 client (path-style) at `url` with the given keys.
pub fn s3_client(url: &str, key: &str, secret: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http_client())
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .force_path_style(true)
        .credentials_provider(credentials(key, secret))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// An IAM client on the peer, with its admin keys.
pub fn iam_client(peer: &Peer) -> aws_sdk_iam::Client {
    let config = aws_sdk_iam::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http_client())
        .region(Region::new("us-east-1"))
        .endpoint_url(&peer.url)
        .credentials_provider(credentials(&peer.key, &peer.secret))
        .build();
    aws_sdk_iam::Client::from_conf(config)
}

/// An EC2 client on the peer, with its admin keys.
pub fn ec2_client(peer: &Peer) -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http_client())
        .region(Region::new("us-east-1"))
        .endpoint_url(&peer.url)
        .credentials_provider(credentials(&peer.key, &peer.secret))
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// The JSON object stored at `key`.
pub async fn s3_json(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> serde_json::Value {
    let object = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    serde_json::from_slice(&object.body.collect().await.unwrap().into_bytes()).unwrap()
}
