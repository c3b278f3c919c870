//! Warm pools of `s3` buckets (docs/pools.md), on moto and SeaweedFS as the s3 lifecycle tests run them: a hit
//! keeps the pooled bucket's name and gets the instance's tags, a binding writes and reads an object with its
//! own keys, deprovision removes the bucket, the pool refills, and a pool whose target falls to zero drains
//! (its bucket removed).

use std::time::{Duration, Instant};

use aws_sdk_s3::{
    Client,
    config::{BehaviorVersion, Credentials, Region},
    primitives::ByteStream,
};
use berth_tests::{Stack, plan_ids};
use serde_json::{Value, json};

use super::{
    pools::{body, drain_by_restart, metrics, provision_sync, sample, wait_pool},
    s3_lifecycle::env,
};

const WAIT: Duration = Duration::from_secs(90);

fn client(endpoint: &str, region: &str, key: &str, secret: &str) -> Client {
    use aws_smithy_http_client::{Builder, tls};
    let http = Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(key, secret, None, None, "e2e"))
        .http_client(http)
        .build();
    Client::from_conf(config)
}

async fn bucket_exists(admin: &Client, bucket: &str) -> bool {
    admin.head_bucket().bucket(bucket).send().await.is_ok()
}

/// The store as the tests reach it: its endpoint, the operator's keys, and whether it keeps bucket tags.
struct Store {
    endpoint: String,
    admin: Client,
    keeps_tags: bool,
}

async fn pool_hit_binding_deprovision_refill_drain(mut stack: Stack, store: Store) {
    let ids = plan_ids(&stack.catalog().await.unwrap(), "s3", "basic");
    let item = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    let bucket = item.details["bucket"].as_str().unwrap().to_string();
    assert!(bucket_exists(&store.admin, &bucket).await);
    assert!(
        item.secrets.is_none(),
        "a pooled bucket holds no credential"
    );

    // A hit: 201 at once, the pooled bucket is the instance's, with the instance's tags.
    let instance = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let (status, answer) = provision_sync(
        &stack,
        &instance,
        &body(&ids, json!({"tags": {"team": "pool"}})),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, 201, "{answer}\n{}", stack.logs());
    println!("s3 provision from the pool answered in {took:?}");
    let details = stack.instance_details(&instance).await;
    assert_eq!(details["pool_item"], json!(item.id), "{details}");
    assert_eq!(details["bucket"], json!(bucket));
    if store.keeps_tags {
        let tags = store
            .admin
            .get_bucket_tagging()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        let tag = |key: &str| {
            tags.tag_set()
                .iter()
                .find(|t| t.key() == key)
                .map(|t| t.value().to_string())
        };
        assert_eq!(tag("berth:instance"), Some(instance.clone()));
        assert_eq!(tag("team"), Some("pool".to_string()));
    }

    // A binding writes and reads an object with its own keys, in the pooled bucket.
    let path = format!("/v2/service_instances/{instance}");
    let binding = format!("{path}/service_bindings/app-1");
    stack
        .put_until_done(
            &binding,
            &json!({"service_id": ids.0, "plan_id": ids.1}),
            WAIT,
        )
        .await;
    let creds: Value = stack.fetch_credentials(&binding).await;
    assert_eq!(creds["S3_BUCKET"], json!(bucket));
    assert_eq!(creds["S3_ENDPOINT"], json!(store.endpoint));
    let app = client(
        &store.endpoint,
        creds["S3_REGION"].as_str().unwrap(),
        creds["S3_ACCESS_KEY"].as_str().unwrap(),
        creds["S3_SECRET_KEY"].as_str().unwrap(),
    );
    app.put_object()
        .bucket(&bucket)
        .key("hello.txt")
        .body(ByteStream::from_static(b"from the pool"))
        .send()
        .await
        .expect("the binding writes an object");
    let read = app
        .get_object()
        .bucket(&bucket)
        .key("hello.txt")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(&read[..], b"from the pool");

    // Deprovision (the object in it): the bucket is gone.
    let (status, _) = stack.delete_until_done(&binding, &ids, WAIT).await;
    assert!(status == 200 || status == 410);
    let (status, last) = stack.delete_until_done(&path, &ids, WAIT).await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    assert!(
        !bucket_exists(&store.admin, &bucket).await,
        "the bucket survived"
    );

    // The pool refilled with a new bucket; the metrics counted the hit.
    let refilled = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    assert_ne!(refilled.id, item.id);
    let refilled_bucket = refilled.details["bucket"].as_str().unwrap().to_string();
    assert_ne!(refilled_bucket, bucket);
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "berth_pool_hits_total", "basic", ""),
        Some(1.0),
        "{text}"
    );

    // A miss: a `region` parameter (even the default one) is never served from the pool; the ordinary path
    // makes a bucket named after the instance.
    let region = creds["S3_REGION"].as_str().unwrap();
    let other = uuid::Uuid::new_v4().to_string();
    let other_path = format!("/v2/service_instances/{other}");
    stack
        .put_until_done(&other_path, &body(&ids, json!({"region": region})), WAIT)
        .await;
    let made = stack.instance_details(&other).await;
    assert!(made.get("pool_item").is_none(), "{made}");
    assert_ne!(made["bucket"], json!(refilled_bucket));
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "berth_pool_misses_total", "basic", ""),
        Some(1.0),
        "{text}"
    );
    let (status, _) = stack.delete_until_done(&other_path, &ids, WAIT).await;
    assert_eq!(status, 410);

    // The target falls to zero: the pool drains and its bucket is removed.
    drain_by_restart(&mut stack, &ids.1, "basic=0", WAIT).await;
    assert!(!bucket_exists(&store.admin, &refilled_bucket).await);
    stack.stop().await;
}

#[tokio::test]
async fn s3_pools_on_moto() {
    let url = env("BERTH_TEST_MOTO_URL");
    let (key, secret) = (
        env("BERTH_TEST_MOTO_ACCESS_KEY"),
        env("BERTH_TEST_MOTO_SECRET_KEY"),
    );
    let stack = Stack::start_with(vec![
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", url.clone()),
        ("AWS_ACCESS_KEY_ID", key.clone()),
        ("AWS_SECRET_ACCESS_KEY", secret.clone()),
        ("POOL_TARGETS", "basic=1".into()),
        ("POOL_CHECK_MS", "200".into()),
    ])
    .await
    .unwrap();
    let admin = client(&url, "us-east-1", &key, &secret);
    let store = Store {
        endpoint: url,
        admin,
        keeps_tags: true,
    };
    pool_hit_binding_deprovision_refill_drain(stack, store).await;
}

#[tokio::test]
async fn s3_pools_on_seaweedfs() {
    let url = env("BERTH_TEST_S3_COMPAT_URL");
    let (key, secret) = (
        env("BERTH_TEST_S3_COMPAT_ACCESS_KEY"),
        env("BERTH_TEST_S3_COMPAT_SECRET_KEY"),
    );
    let stack = Stack::start_with(vec![
        ("S3_COMPATIBLE_ENDPOINT", url.clone()),
        ("S3_COMPATIBLE_IAM_ENDPOINT", url.clone()),
        ("S3_COMPATIBLE_ACCESS_KEY", key.clone()),
        ("S3_COMPATIBLE_SECRET_KEY", secret.clone()),
        ("POOL_TARGETS", "basic=1".into()),
        ("POOL_CHECK_MS", "200".into()),
    ])
    .await
    .unwrap();
    let admin = client(&url, "us-east-1", &key, &secret);
    let store = Store {
        endpoint: url,
        admin,
        keeps_tags: false,
    };
    pool_hit_binding_deprovision_refill_drain(stack, store).await;
}
