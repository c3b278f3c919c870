//! The `s3` engine against real peers started by `scripts/test.sh`: moto (AWS S3 + IAM, with IAM enforced)
//! and SeaweedFS (`weed mini`, an S3-compatible store with an IAM-style API). Without their variables these
//! tests fail: they are never skipped silently.

use std::sync::Arc;

use aws_sdk_s3::{
    Client,
    config::{BehaviorVersion, Credentials, Region},
    primitives::ByteStream,
    types::BucketVersioningStatus,
};
use berth_worker::Services;
use broker::{
    db::{bindings, instances, tasks::NewTask},
    model::{Operation, UpdatePayload},
    names,
};
use serde_json::{Map, Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::helpers::*;

async fn new_instance(pool: &PgPool, plan: &str, parameters: Value) -> String {
    let context = json!({ "platform": "cloudfoundry", "organization_guid": "org-1", "space_guid": "space-1" });
    insert_instance(pool, SERVICE, plan, context, parameters).await
}

async fn new_binding(pool: &PgPool, instance_id: &str, plan: &str, parameters: Value) -> String {
    insert_binding(pool, instance_id, SERVICE, plan, parameters).await
}

const SERVICE: &str = "6f0c2f4e-3b1a-4c55-9d0e-8a4b7c2e1f01";
const BASIC: &str = "b1c7a3e0-52d4-4f0a-8e61-3d2f9a7c5b11";
const VERSIONED: &str = "c2d8b4f1-63e5-4a1b-9f72-4e3a0b8d6c22";
const ENCRYPTED: &str = "d3e9c5a2-74f6-4b2c-8a83-5f4b1c9e7d33";
const ENCRYPTED_VERSIONED: &str = "e4fad6b3-8507-4c3d-9b94-6a5c2daf8e44";
const PREFIX: &str = "bt_";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run ./scripts/test.sh, which starts moto and SeaweedFS and sets it"
        )
    })
}

/// The moto server and its admin keys.
pub(crate) struct Peer {
    pub url: String,
    pub key: String,
    pub secret: String,
}

pub(crate) fn moto() -> Peer {
    Peer {
        url: env("BERTH_TEST_MOTO_URL"),
        key: env("BERTH_TEST_MOTO_ACCESS_KEY"),
        secret: env("BERTH_TEST_MOTO_SECRET_KEY"),
    }
}

pub(crate) fn seaweed() -> Peer {
    Peer {
        url: env("BERTH_TEST_S3_COMPAT_URL"),
        key: env("BERTH_TEST_S3_COMPAT_ACCESS_KEY"),
        secret: env("BERTH_TEST_S3_COMPAT_SECRET_KEY"),
    }
}

fn aws_services(peer: &Peer) -> Arc<Services> {
    let settings = serde_json::from_value(json!({
        "plans_dir": plans_dir(), "name_prefix": PREFIX,
        "aws_region": "us-east-1", "aws_endpoint_url": peer.url,
        "aws_access_key_id": peer.key, "aws_secret_access_key": peer.secret,
    }))
    .unwrap();
    Arc::new(Services::new(settings, cipher()).expect("services"))
}

fn compatible_services(peer: &Peer) -> Arc<Services> {
    let settings = serde_json::from_value(json!({
        "plans_dir": plans_dir(), "name_prefix": PREFIX,
        "s3_compatible_endpoint": peer.url, "s3_compatible_iam_endpoint": peer.url,
        "s3_compatible_access_key": peer.key, "s3_compatible_secret_key": peer.secret,
    }))
    .unwrap();
    Arc::new(Services::new(settings, cipher()).expect("services"))
}

pub(crate) fn client(url: &str, key: &str, secret: &str) -> Client {
    use aws_smithy_http_client::{Builder, tls};
    let http = Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .force_path_style(true)
        .credentials_provider(Credentials::new(key, secret, None, None, "test"))
        .build();
    Client::from_conf(config)
}

fn iam_client(peer: &Peer) -> aws_sdk_iam::Client {
    use aws_smithy_http_client::{Builder, tls};
    let http = Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_iam::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new("us-east-1"))
        .endpoint_url(&peer.url)
        .credentials_provider(Credentials::new(
            &peer.key,
            &peer.secret,
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_iam::Client::from_conf(config)
}

fn admin(peer: &Peer) -> Client {
    client(&peer.url, &peer.key, &peer.secret)
}

async fn credentials(pool: &PgPool, binding_id: &str) -> Map<String, Value> {
    let row = bindings::get(pool, binding_id).await.unwrap().unwrap();
    cipher()
        .open_json(&row.credentials.expect("credentials stored"))
        .unwrap()
}

fn app_client(peer: &Peer, creds: &Map<String, Value>) -> Client {
    client(
        &peer.url,
        creds["S3_ACCESS_KEY"].as_str().unwrap(),
        creds["S3_SECRET_KEY"].as_str().unwrap(),
    )
}

async fn put(c: &Client, bucket: &str, key: &str, body: &str) -> Result<(), String> {
    c.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body.as_bytes().to_vec()))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("{:?}", aws_sdk_s3::error::ProvideErrorMetadata::code(&e)))
}

async fn get(c: &Client, bucket: &str, key: &str) -> Result<String, String> {
    let out = c
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| format!("{:?}", aws_sdk_s3::error::ProvideErrorMetadata::code(&e)))?;
    let bytes = out
        .body
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .into_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// moto names the answer's root `GetBucketVersioningResponse` (S3: `VersioningConfiguration`), which the SDK
/// refuses to parse: read the status from the raw body then.
async fn versioning_enabled(c: &Client, bucket: &str) -> bool {
    match c.get_bucket_versioning().bucket(bucket).send().await {
        Ok(out) => out.status() == Some(&BucketVersioningStatus::Enabled),
        Err(aws_sdk_s3::error::SdkError::ServiceError(e)) => {
            let body = e
                .raw()
                .body()
                .bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned());
            body.expect("a buffered body")
                .contains("<Status>Enabled</Status>")
        }
        Err(e) => panic!("reading the bucket's versioning: {e:?}"),
    }
}

async fn bucket_exists(c: &Client, bucket: &str) -> bool {
    c.head_bucket().bucket(bucket).send().await.is_ok()
}

async fn users_of(peer: &Peer, bucket: &str) -> Vec<String> {
    let out = iam_client(peer).list_users().send().await.unwrap();
    let path = format!("/berth/{bucket}/");
    out.users()
        .iter()
        .filter(|u| u.path() == path)
        .map(|u| u.user_name().to_string())
        .collect()
}

/// Bind A (read-write) and B (read-only); each works as its access says, A cannot reach another bucket;
/// unbinding A revokes A only.
async fn two_bindings(
    pool: &PgPool,
    services: &Arc<Services>,
    peer: &Peer,
    instance: &str,
    plan: &str,
) -> [String; 2] {
    let bucket = names::bucket_name(PREFIX, instance);
    let a = new_binding(pool, instance, plan, json!({})).await;
    let b = new_binding(pool, instance, plan, json!({ "access": "read-only" })).await;
    succeeded(
        &operate(
            pool,
            services,
            Operation::Bind,
            instance,
            Some(&a),
            json!({}),
        )
        .await,
    );
    succeeded(
        &operate(
            pool,
            services,
            Operation::Bind,
            instance,
            Some(&b),
            json!({}),
        )
        .await,
    );
    let (ca, cb) = (credentials(pool, &a).await, credentials(pool, &b).await);
    assert_eq!(ca["S3_BUCKET"], json!(bucket));
    assert_eq!(ca["S3_LOCATION"], json!(format!("s3://{bucket}")));
    assert_eq!(ca["S3_REGION"], json!("us-east-1"));
    assert_eq!(ca["S3_ENDPOINT"], json!(peer.url));
    assert!(
        ca["uri"].as_str().unwrap().starts_with("s3://"),
        "{}",
        ca["uri"]
    );
    assert_ne!(
        ca["S3_ACCESS_KEY"], cb["S3_ACCESS_KEY"],
        "each binding has its own key"
    );
    let details = bindings::get(pool, &a).await.unwrap().unwrap().details;
    assert!(details["endpoints"][0]["host"].is_string(), "{details}");
    let (app_a, app_b) = (app_client(peer, &ca), app_client(peer, &cb));

    put(&app_a, &bucket, "hello.txt", "from A")
        .await
        .expect("A writes");
    assert_eq!(get(&app_a, &bucket, "hello.txt").await.unwrap(), "from A");
    assert_eq!(
        get(&app_b, &bucket, "hello.txt").await.unwrap(),
        "from A",
        "B reads"
    );
    assert!(
        put(&app_b, &bucket, "b.txt", "no").await.is_err(),
        "read-only B cannot write"
    );

    // Another bucket (of nobody's binding): A's keys cannot touch it.
    let other = format!(
        "bt-other-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let root = admin(peer);
    root.create_bucket().bucket(&other).send().await.unwrap();
    put(&root, &other, "secret.txt", "root").await.unwrap();
    assert!(
        get(&app_a, &other, "secret.txt").await.is_err(),
        "A reads another bucket"
    );
    assert!(
        put(&app_a, &other, "x.txt", "A").await.is_err(),
        "A writes another bucket"
    );
    root.delete_object()
        .bucket(&other)
        .key("secret.txt")
        .send()
        .await
        .unwrap();
    root.delete_bucket().bucket(&other).send().await.unwrap();

    // Unbind A: A is refused, B still reads.
    succeeded(
        &operate(
            pool,
            services,
            Operation::Unbind,
            instance,
            Some(&a),
            json!({}),
        )
        .await,
    );
    assert!(bindings::get(pool, &a).await.unwrap().is_none());
    assert!(
        get(&app_a, &bucket, "hello.txt").await.is_err(),
        "A's key still works after unbind"
    );
    assert_eq!(get(&app_b, &bucket, "hello.txt").await.unwrap(), "from A");
    assert!(
        !user_exists(peer, &names::binding_user(PREFIX, &a)).await,
        "A's user remains"
    );
    assert!(
        user_exists(peer, &names::binding_user(PREFIX, &b)).await,
        "B's user is gone"
    );
    [a, b]
}

async fn user_exists(peer: &Peer, user: &str) -> bool {
    let out = iam_client(peer).list_users().send().await.unwrap();
    out.users().iter().any(|u| u.user_name() == user)
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_each_plan_on_moto(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let services = aws_services(&peer);
    let root = admin(&peer);
    for (plan, versioned, encrypted) in [
        (BASIC, false, false),
        (VERSIONED, true, false),
        (ENCRYPTED, false, true),
        (ENCRYPTED_VERSIONED, true, true),
    ] {
        let params = json!({ "tags": { "team": "data" },
            "cors": [{ "allowed_methods": ["GET"], "allowed_origins": ["https://example.com"] }] });
        let instance = new_instance(&pool, plan, params).await;
        let bucket = names::bucket_name(PREFIX, &instance);
        // Twice: the second run finds everything and is harmless.
        succeeded(
            &operate(
                &pool,
                &services,
                Operation::Provision,
                &instance,
                None,
                json!({}),
            )
            .await,
        );
        succeeded(
            &operate(
                &pool,
                &services,
                Operation::Provision,
                &instance,
                None,
                json!({}),
            )
            .await,
        );
        assert!(bucket_exists(&root, &bucket).await, "{bucket}");
        let details = instances::get(&pool, &instance)
            .await
            .unwrap()
            .unwrap()
            .details;
        assert_eq!(details["bucket"], json!(bucket));

        let tags = root
            .get_bucket_tagging()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        let tag = |k: &str| {
            tags.tag_set()
                .iter()
                .find(|t| t.key() == k)
                .map(|t| t.value().to_string())
        };
        assert_eq!(tag("berth:instance").as_deref(), Some(instance.as_str()));
        assert_eq!(tag("berth:organization").as_deref(), Some("org-1"));
        assert_eq!(tag("berth:space").as_deref(), Some("space-1"));
        assert_eq!(tag("team").as_deref(), Some("data"));

        let block = root
            .get_public_access_block()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        let block = block.public_access_block_configuration().unwrap();
        assert_eq!(block.block_public_acls(), Some(true));
        assert_eq!(block.restrict_public_buckets(), Some(true));
        let cors = root.get_bucket_cors().bucket(&bucket).send().await.unwrap();
        assert_eq!(cors.cors_rules().len(), 1);

        assert_eq!(
            versioning_enabled(&root, &bucket).await,
            versioned,
            "{plan}"
        );
        if versioned {
            let lifecycle = root
                .get_bucket_lifecycle_configuration()
                .bucket(&bucket)
                .send()
                .await
                .unwrap();
            let rule = &lifecycle.rules()[0];
            assert_eq!(
                rule.noncurrent_version_transitions()[0].noncurrent_days(),
                Some(30)
            );
            assert_eq!(
                rule.noncurrent_version_expiration()
                    .unwrap()
                    .noncurrent_days(),
                Some(180)
            );
        }
        let encryption = root.get_bucket_encryption().bucket(&bucket).send().await;
        let algorithm = encryption.ok().and_then(|e| {
            e.server_side_encryption_configuration()?
                .rules()
                .first()?
                .apply_server_side_encryption_by_default()
                .map(|d| d.sse_algorithm().as_str().to_string())
        });
        if encrypted {
            assert_eq!(algorithm.as_deref(), Some("AES256"), "{plan}");
        }

        if plan == BASIC {
            two_bindings(&pool, &services, &peer, &instance, plan).await;
        } else {
            let b = new_binding(&pool, &instance, plan, json!({})).await;
            succeeded(
                &operate(
                    &pool,
                    &services,
                    Operation::Bind,
                    &instance,
                    Some(&b),
                    json!({}),
                )
                .await,
            );
            let app = app_client(&peer, &credentials(&pool, &b).await);
            put(&app, &bucket, "k", "v")
                .await
                .expect("write with the binding's key");
        }
        // Deprovision with bindings still there: bucket, users, keys and policies all go.
        succeeded(
            &operate(
                &pool,
                &services,
                Operation::Deprovision,
                &instance,
                None,
                json!({}),
            )
            .await,
        );
        assert!(!bucket_exists(&root, &bucket).await, "{bucket} remains");
        assert!(
            users_of(&peer, &bucket).await.is_empty(),
            "IAM users remain"
        );
        assert!(instances::get(&pool, &instance).await.unwrap().is_none());
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_update_turns_versioning_and_encryption_on(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let services = aws_services(&peer);
    let root = admin(&peer);
    let instance = new_instance(&pool, BASIC, json!({})).await;
    let bucket = names::bucket_name(PREFIX, &instance);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let update = UpdatePayload {
        plan_id: ENCRYPTED_VERSIONED.into(),
        parameters: json!({ "public_read": false }),
        context: json!({ "organization_guid": "org-1", "space_guid": "space-2" }),
        maintenance_version: None,
        select_preset: false,
    };
    let payload = serde_json::to_value(&update).unwrap();
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Update,
            &instance,
            None,
            payload,
        )
        .await,
    );
    assert!(versioning_enabled(&root, &bucket).await);
    assert!(
        root.get_bucket_encryption()
            .bucket(&bucket)
            .send()
            .await
            .is_ok()
    );
    let tags = root
        .get_bucket_tagging()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(
        tags.tag_set()
            .iter()
            .any(|t| t.key() == "berth:space" && t.value() == "space-2")
    );
    assert_eq!(
        instances::get(&pool, &instance)
            .await
            .unwrap()
            .unwrap()
            .plan_id,
        ENCRYPTED_VERSIONED
    );
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    assert!(!bucket_exists(&root, &bucket).await);
}

/// Writes `n` objects (and, every 10th, two more versions and then a delete marker) concurrently.
async fn fill(c: &Client, bucket: &str, n: usize, versions: bool) {
    let mut set = tokio::task::JoinSet::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(n.div_ceil(16)) {
        let (c, bucket, chunk) = (c.clone(), bucket.to_string(), chunk.to_vec());
        set.spawn(async move {
            for i in chunk {
                let key = format!("obj/{i:05}");
                put(&c, &bucket, &key, "v1").await.unwrap();
                if versions && i % 10 == 0 {
                    put(&c, &bucket, &key, "v2").await.unwrap();
                    put(&c, &bucket, &key, "v3").await.unwrap();
                    c.delete_object()
                        .bucket(&bucket)
                        .key(&key)
                        .send()
                        .await
                        .unwrap();
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_deprovision_empties_1000_objects_with_versions(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let services = aws_services(&peer);
    let root = admin(&peer);
    let instance = new_instance(&pool, VERSIONED, json!({})).await;
    let bucket = names::bucket_name(PREFIX, &instance);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let b = new_binding(&pool, &instance, VERSIONED, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&b),
            json!({}),
        )
        .await,
    );
    fill(&root, &bucket, 1000, true).await;
    let listed = root
        .list_object_versions()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(
        listed.is_truncated() == Some(true),
        "more than one page of versions"
    );

    // A binding row lost midway (its IAM user remains): deprovision still finds the user by its path.
    sqlx::query("DELETE FROM service_bindings WHERE id = $1")
        .bind(&b)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(users_of(&peer, &bucket).await.len(), 1);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    assert!(!bucket_exists(&root, &bucket).await, "{bucket} remains");
    assert!(
        users_of(&peer, &bucket).await.is_empty(),
        "IAM users remain"
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_deprovision_of_a_half_built_instance(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let services = aws_services(&peer);
    // Never provisioned: nothing exists, deprovision succeeds.
    let instance = new_instance(&pool, BASIC, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    // Bucket made by hand under the instance's name, unconfigured, with objects: cleaned up too.
    let instance = new_instance(&pool, BASIC, json!({})).await;
    let bucket = names::bucket_name(PREFIX, &instance);
    let root = admin(&peer);
    root.create_bucket().bucket(&bucket).send().await.unwrap();
    fill(&root, &bucket, 20, false).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    assert!(!bucket_exists(&root, &bucket).await);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_compatible_engine_on_seaweedfs(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let peer = seaweed();
    let services = compatible_services(&peer);
    let root = admin(&peer);
    let instance = new_instance(&pool, VERSIONED, json!({ "tags": { "team": "data" } })).await;
    let bucket = names::bucket_name(PREFIX, &instance);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    assert!(bucket_exists(&root, &bucket).await);
    assert!(versioning_enabled(&root, &bucket).await);
    let tags = root
        .get_bucket_tagging()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(
        tags.tag_set()
            .iter()
            .any(|t| t.key() == "berth:instance" && t.value() == instance)
    );

    let [a, b] = two_bindings(&pool, &services, &peer, &instance, VERSIONED).await;
    fill(&root, &bucket, 50, true).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    assert!(!bucket_exists(&root, &bucket).await, "{bucket} remains");
    // SeaweedFS keeps no IAM paths: look the users up by name.
    for binding in [a, b] {
        assert!(
            !user_exists(&peer, &names::binding_user(PREFIX, &binding)).await,
            "a user remains"
        );
    }
}

fn spawn_s3_worker(
    opts: &PgConnectOptions,
    key_file: &std::path::Path,
    peer: &Peer,
    id: &str,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_berth-worker"))
        .env("DATABASE_URL", database_url(opts))
        .env("BERTH_KEY_FILE", key_file)
        .env("PLANS_DIR", plans_dir())
        .env("NAME_PREFIX", PREFIX)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", &peer.url)
        .env("AWS_ACCESS_KEY_ID", &peer.key)
        .env("AWS_SECRET_ACCESS_KEY", &peer.secret)
        .env("WORKER_LEASE_SECS", "2")
        .env("WORKER_POLL_MS", "200")
        .env("WORKER_ID", id)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting berth-worker")
}

/// kill -9 of the worker while it empties a large bucket: a second worker finishes the deprovision, and
/// nothing remains.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_kill_9_mid_empty_then_another_worker_finishes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use std::time::Duration;
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let services = aws_services(&peer);
    let root = admin(&peer);
    let instance = new_instance(&pool, VERSIONED, json!({})).await;
    let bucket = names::bucket_name(PREFIX, &instance);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    fill(&root, &bucket, 4000, true).await;

    let dir = std::env::temp_dir().join(format!("berth-s3-crash-{}", uuid::Uuid::new_v4()));
    let key_file = dir.join("master.key");
    broker::crypto::generate_key_file(&key_file).unwrap();
    let mut new = NewTask::new(Operation::Deprovision.task_kind(), json!({}));
    new.instance_id = Some(instance.clone());
    new.operation = Some(Operation::Deprovision);
    let id = enqueue_with(&pool, new).await;

    let mut first = spawn_s3_worker(&opts, &key_file, &peer, "victim");
    eventually(
        Duration::from_secs(60),
        "the first worker to start emptying",
        || async {
            let row = task(&pool, id).await;
            row.progress
                .as_deref()
                .is_some_and(|p| p.starts_with("emptying the bucket"))
                .then_some(())
        },
    )
    .await;
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    assert_eq!(task(&pool, id).await.state, "running", "killed mid-empty");
    assert!(
        bucket_exists(&root, &bucket).await,
        "the bucket was already gone when the worker died"
    );

    let mut second = spawn_s3_worker(&opts, &key_file, &peer, "rescuer");
    let row = eventually(
        Duration::from_secs(120),
        "the second worker to finish",
        || async {
            let row = task(&pool, id).await;
            row.state().is_finished().then_some(row)
        },
    )
    .await;
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
    succeeded(&row);
    assert_eq!(row.worker_id.as_deref(), Some("rescuer"));
    assert!(!bucket_exists(&root, &bucket).await, "{bucket} remains");
    assert!(instances::get(&pool, &instance).await.unwrap().is_none());
}

/// `public_read`: no public-access block and a public-read policy; turned off by an update, the policy goes
/// and the block comes back.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_public_read_on_and_off(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let services = aws_services(&peer);
    let root = admin(&peer);
    let instance = new_instance(&pool, BASIC, json!({ "public_read": true })).await;
    let bucket = names::bucket_name(PREFIX, &instance);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let policy = root
        .get_bucket_policy()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(policy.policy().unwrap().contains("BerthPublicRead"));
    assert!(
        root.get_public_access_block()
            .bucket(&bucket)
            .send()
            .await
            .is_err(),
        "no block"
    );

    let update = UpdatePayload {
        plan_id: BASIC.into(),
        parameters: json!({ "public_read": false }),
        context: json!({}),
        maintenance_version: None,
        select_preset: false,
    };
    let payload = serde_json::to_value(&update).unwrap();
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Update,
            &instance,
            None,
            payload,
        )
        .await,
    );
    assert!(
        root.get_bucket_policy()
            .bucket(&bucket)
            .send()
            .await
            .is_err(),
        "the policy is gone"
    );
    let block = root
        .get_public_access_block()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(
        block
            .public_access_block_configuration()
            .unwrap()
            .block_public_policy(),
        Some(true)
    );
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
}

/// The keys each binding's IAM user has now.
async fn keys_of(peer: &Peer, user: &str) -> Vec<String> {
    let out = iam_client(peer)
        .list_access_keys()
        .user_name(user)
        .send()
        .await
        .unwrap();
    out.access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id().map(str::to_string))
        .collect()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_rotate_credentials_gives_each_binding_a_new_key_and_revokes_the_old(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let services = aws_services(&peer);
    let instance = new_instance(&pool, BASIC, json!({})).await;
    let bucket = names::bucket_name(PREFIX, &instance);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    // A read-write and a read-only binding (two_bindings unbinds its first one).
    let a = new_binding(&pool, &instance, BASIC, json!({})).await;
    let b = new_binding(&pool, &instance, BASIC, json!({ "access": "read-only" })).await;
    for binding in [&a, &b] {
        succeeded(
            &operate(
                &pool,
                &services,
                Operation::Bind,
                &instance,
                Some(binding),
                json!({}),
            )
            .await,
        );
    }
    let (old_a, old_b) = (credentials(&pool, &a).await, credentials(&pool, &b).await);
    put(&app_client(&peer, &old_a), &bucket, "before", "1")
        .await
        .unwrap();
    // A key left by an interrupted rotation (made, never stored): the rotation removes it too.
    let user_a = names::binding_user(PREFIX, &a);
    let stray = iam_client(&peer)
        .create_access_key()
        .user_name(&user_a)
        .send()
        .await
        .unwrap()
        .access_key()
        .unwrap()
        .access_key_id()
        .to_string();

    let rotation = operate(
        &pool,
        &services,
        Operation::RotateCredentials,
        &instance,
        None,
        json!({}),
    )
    .await;
    succeeded(&rotation);

    let (new_a, new_b) = (credentials(&pool, &a).await, credentials(&pool, &b).await);
    for (old, new) in [(&old_a, &new_a), (&old_b, &new_b)] {
        assert_ne!(old["S3_ACCESS_KEY"], new["S3_ACCESS_KEY"]);
        assert_ne!(old["S3_SECRET_KEY"], new["S3_SECRET_KEY"]);
        assert_eq!(old["S3_BUCKET"], new["S3_BUCKET"]);
        assert!(
            new["uri"]
                .as_str()
                .unwrap()
                .contains(new["S3_ACCESS_KEY"].as_str().unwrap())
        );
    }
    // The new keys work with their binding's access; the old ones are refused.
    let (app_a, app_b) = (app_client(&peer, &new_a), app_client(&peer, &new_b));
    put(&app_a, &bucket, "after", "2").await.unwrap();
    assert_eq!(get(&app_a, &bucket, "before").await.unwrap(), "1");
    assert_eq!(get(&app_b, &bucket, "after").await.unwrap(), "2");
    assert!(
        put(&app_b, &bucket, "nope", "x").await.is_err(),
        "b is still read-only"
    );
    for old in [&old_a, &old_b] {
        let refused = get(&app_client(&peer, old), &bucket, "before").await;
        assert!(refused.is_err(), "an old key still works: {refused:?}");
    }
    // One key per user: the stored one.
    assert_eq!(
        keys_of(&peer, &user_a).await,
        vec![new_a["S3_ACCESS_KEY"].as_str().unwrap().to_string()]
    );
    assert!(!keys_of(&peer, &user_a).await.contains(&stray));
    assert_eq!(
        keys_of(&peer, &names::binding_user(PREFIX, &b)).await,
        vec![new_b["S3_ACCESS_KEY"].as_str().unwrap().to_string()]
    );

    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    assert!(!bucket_exists(&admin(&peer), &bucket).await);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_rotate_credentials_fails_where_bindings_share_the_store_keys(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = seaweed();
    let settings = serde_json::from_value(json!({
        "plans_dir": plans_dir(), "name_prefix": PREFIX,
        "s3_compatible_endpoint": peer.url,
        "s3_compatible_access_key": peer.key, "s3_compatible_secret_key": peer.secret,
    }))
    .unwrap();
    let services = Arc::new(Services::new(settings, cipher()).expect("services"));
    let instance = new_instance(&pool, BASIC, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let binding = new_binding(&pool, &instance, BASIC, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&binding),
            json!({}),
        )
        .await,
    );
    let before = credentials(&pool, &binding).await;

    let rotation = operate(
        &pool,
        &services,
        Operation::RotateCredentials,
        &instance,
        None,
        json!({}),
    )
    .await;
    assert_eq!(rotation.state, "failed");
    let error = rotation.last_error.unwrap_or_default();
    assert!(error.contains("cannot rotate credentials"), "{error}");
    assert_eq!(
        credentials(&pool, &binding).await,
        before,
        "nothing changed"
    );

    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
}

/// An expired binding's IAM user and key are deleted by the reconcile loop's revocation; the other binding's key
/// works on.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_an_expired_binding_loses_its_key(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let services = aws_services(&peer);
    let instance = new_instance(&pool, BASIC, json!({})).await;
    let bucket = names::bucket_name(PREFIX, &instance);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let expiring = new_binding(&pool, &instance, BASIC, json!({ "expires_in": 600 })).await;
    let lasting = new_binding(&pool, &instance, BASIC, json!({})).await;
    for binding in [&expiring, &lasting] {
        succeeded(
            &operate(
                &pool,
                &services,
                Operation::Bind,
                &instance,
                Some(binding),
                json!({}),
            )
            .await,
        );
    }
    let expiring_client = app_client(&peer, &credentials(&pool, &expiring).await);
    put(&expiring_client, &bucket, "a", "1")
        .await
        .expect("the expiring key works before it expires");
    let user = names::binding_user(PREFIX, &expiring);
    assert_eq!(keys_of(&peer, &user).await.len(), 1);

    sqlx::query(
        "UPDATE service_bindings SET expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(&expiring)
    .execute(&pool)
    .await
    .unwrap();
    berth_worker::reconcile::once(&pool, &services).await;
    drain(
        &pool,
        services.clone(),
        berth_worker::tasks::registry(),
        config("w"),
    )
    .await;

    assert!(
        !user_exists(&peer, &user).await,
        "the expired binding's IAM user is deleted"
    );
    assert!(
        put(&expiring_client, &bucket, "b", "2").await.is_err(),
        "its key is refused"
    );
    assert!(
        bindings::get(&pool, &expiring)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );
    let lasting_client = app_client(&peer, &credentials(&pool, &lasting).await);
    assert_eq!(
        get(&lasting_client, &bucket, "a").await.unwrap(),
        "1",
        "the other binding's key works on"
    );
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Unbind,
            &instance,
            Some(&expiring),
            json!({}),
        )
        .await,
    );
    assert!(bindings::get(&pool, &expiring).await.unwrap().is_none());
}
