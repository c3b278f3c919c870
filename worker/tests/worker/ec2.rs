//! The `ec2` engine against moto (started by `scripts/test.sh`, IAM enforced; EC2 is served by the same
//! server), with the readiness probe off since nothing listens on moto's VMs. Connection delivery lands in the
//! real SeaweedFS. Without the peers' variables these tests fail; they are never skipped.

use std::{path::Path, sync::Arc, time::Duration};

use aws_sdk_ec2::{Client, types::Filter};
use base64::Engine as _;
use berth_worker::Services;
use broker::{
    db::{bindings, ec2_offers, instances, pools},
    ec2::{Requirements, candidates},
    model::Operation,
};
use serde_json::{Map, Value, json};
use sqlx::{PgPool, postgres::PgConnectOptions};

use crate::{
    helpers::*,
    peers::{Peer, ec2_client as ec2, moto, s3_client, s3_json, seaweed},
};

const SPOT: &str = "8c4b2a71-3e5d-4f60-9a1b-7d2e6c0f5a13";

/// An x86_64 and an arm64 image moto knows (it has no Debian owner).
async fn images(client: &Client) -> (String, String) {
    let all = client
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .unwrap();
    let pick = |arch: &str| {
        all.images()
            .iter()
            .find(|i| i.architecture().is_some_and(|a| a.as_str() == arch))
            .and_then(|i| i.image_id())
            .map(str::to_string)
    };
    (
        pick("x86_64").expect("an x86_64 image"),
        pick("arm64").or(pick("x86_64")).unwrap(),
    )
}

pub(crate) async fn services_with(peer: &Peer, extra: Value) -> Arc<Services> {
    let client = ec2(peer);
    let (x86, arm) = images(&client).await;
    let mut settings = json!({
        "plans_dir": plans_dir(), "name_prefix": PREFIX,
        "aws_region": "us-east-1", "aws_endpoint_url": peer.url,
        "aws_access_key_id": peer.key, "aws_secret_access_key": peer.secret,
        "ec2_ami_x86_64": x86, "ec2_ami_arm64": arm, "ec2_readiness_probe": false,
    });
    settings
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Arc::new(Services::new(serde_json::from_value(settings).unwrap(), cipher()).expect("services"))
}

async fn provision(pool: &PgPool, services: &Arc<Services>, parameters: Value) -> (String, Value) {
    let id = insert_instance(
        pool,
        POSTGRES,
        SPOT,
        json!({ "instance_name": "pg-test" }),
        parameters,
    )
    .await;
    operate_ok(pool, services, Operation::Provision, &id, None).await;
    let details = details(pool, &id).await;
    (id, details)
}

pub(crate) fn tagged(instance_id: &str) -> Filter {
    Filter::builder()
        .name("tag:berth:instance")
        .values(instance_id)
        .build()
}

pub(crate) async fn live_vms(
    client: &Client,
    instance_id: &str,
) -> Vec<aws_sdk_ec2::types::Instance> {
    let out = client
        .describe_instances()
        .filters(tagged(instance_id))
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| {
            i.state()
                .and_then(|s| s.name())
                .is_some_and(|n| n.as_str() != "terminated")
        })
        .cloned()
        .collect()
}

pub(crate) async fn data_volumes(
    client: &Client,
    instance_id: &str,
) -> Vec<aws_sdk_ec2::types::Volume> {
    client
        .describe_volumes()
        .filters(tagged(instance_id))
        .send()
        .await
        .unwrap()
        .volumes()
        .to_vec()
}

/// A VM's user-data, decoded.
pub(crate) async fn user_data(client: &Client, vm: &aws_sdk_ec2::types::Instance) -> String {
    let attribute = client
        .describe_instance_attribute()
        .instance_id(vm.instance_id().unwrap())
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let encoded = attribute.user_data().and_then(|u| u.value()).unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

/// A VM's availability zone.
pub(crate) fn zone(vm: &aws_sdk_ec2::types::Instance) -> String {
    vm.placement()
        .unwrap()
        .availability_zone()
        .unwrap()
        .to_string()
}

pub(crate) fn tag<'a>(tags: &'a [aws_sdk_ec2::types::Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn launch_is_idempotent_tagged_and_torn_down_in_full(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let client = ec2(&peer);
    let store = seaweed();
    let bucket = new_store_bucket(&store).await;
    let dir = std::env::temp_dir().join(format!("berth-cb-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let callback = write_script(
        &dir,
        "callback.sh",
        &format!("printf '%s\\n' \"$@\" > {}/args\n", dir.display()),
    );
    let services = services_with(
        &peer,
        json!({
            "connstr_bucket": bucket, "connstr_bucket_endpoint": store.url,
            "connstr_bucket_access_key": store.key, "connstr_bucket_access_secret": store.secret,
            "connstr_bucket_key": "berth/{instance_name}.json",
            "setup_finished_callback": callback,
        }),
    )
    .await;
    let keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBerthTestKey test@berth"];
    let (id, details) = provision(
        &pool,
        &services,
        json!({ "cpu_min": 2, "cpu_max": 2, "storage_min": 12, "selection_strategy": "cheapest", "static_ip": true,
                "public_ip": true, "ssh_keys": keys, "tags": { "team": "data" }, "tuning_profile": "web" }),
    )
    .await;

    let (vm, volume) = one_tagged_spot_vm_with_its_volume(&client, &id, &details["ec2"]).await;
    assert_only_postgres_and_ssh_are_open(&client, &id).await;
    // The Elastic IP is the host, associated with the VM.
    let addresses = addresses(&client, &id).await;
    assert_eq!(addresses.len(), 1);
    assert_eq!(addresses[0].instance_id(), vm.instance_id());
    assert_eq!(details["host"], addresses[0].public_ip().unwrap());
    // The user-data is the rendered cloud-config for this volume.
    let user_data = user_data(&client, &vm).await;
    assert!(user_data.starts_with("#cloud-config"), "{user_data}");
    assert!(user_data.contains(&format!("VOLUME_ID={}", volume.volume_id().unwrap())));
    assert!(user_data.contains(keys[0]) && user_data.contains("max_connections = '300'"));
    let delivered = Delivered {
        store: &store,
        bucket: &bucket,
        args_file: &dir.join("args"),
    };
    assert_the_connection_was_delivered(&pool, &delivered, &id, &vm, &details).await;

    assert_a_retried_provision_adopts_what_exists(&pool, &services, &client, &id).await;
    assert_the_teardown_waits_for_reconcile_and_leaves_nothing(&pool, &services, &client, &id)
        .await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// A bucket of its own on the S3-compatible store, for connection delivery.
async fn new_store_bucket(store: &Peer) -> String {
    let bucket = format!("connstr-{}", uuid::Uuid::new_v4().simple());
    s3_client(&store.url, &store.key, &store.secret)
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    bucket
}

/// The Elastic IPs tagged with the instance.
async fn addresses(client: &Client, instance_id: &str) -> Vec<aws_sdk_ec2::types::Address> {
    client
        .describe_addresses()
        .filters(tagged(instance_id))
        .send()
        .await
        .unwrap()
        .addresses()
        .to_vec()
}

/// The security groups tagged with the instance.
pub(crate) async fn security_groups(
    client: &Client,
    instance_id: &str,
) -> Vec<aws_sdk_ec2::types::SecurityGroup> {
    client
        .describe_security_groups()
        .filters(tagged(instance_id))
        .send()
        .await
        .unwrap()
        .security_groups()
        .to_vec()
}

/// One spot VM, tagged, in its data volume's zone; the volume encrypted, tagged, sized and attached.
async fn one_tagged_spot_vm_with_its_volume(
    client: &Client,
    id: &str,
    state: &Value,
) -> (aws_sdk_ec2::types::Instance, aws_sdk_ec2::types::Volume) {
    let vms = live_vms(client, id).await;
    assert_eq!(vms.len(), 1);
    let vm = vms[0].clone();
    assert_eq!(vm.instance_id(), state["vm_id"].as_str());
    assert_eq!(vm.instance_lifecycle().map(|l| l.as_str()), Some("spot"));
    assert_eq!(tag(vm.tags(), "berth:instance"), Some(id));
    assert_eq!(tag(vm.tags(), "team"), Some("data"));
    assert_eq!(
        vm.instance_type().unwrap().as_str(),
        state["candidates"][0]["instance_type"].as_str().unwrap()
    );
    let zone = zone(&vm);
    assert_eq!(state["zone"], zone.as_str());

    let volumes = data_volumes(client, id).await;
    assert_eq!(volumes.len(), 1);
    let volume = volumes[0].clone();
    assert_eq!(volume.encrypted(), Some(true));
    assert_eq!(volume.size(), Some(12));
    assert_eq!(tag(volume.tags(), "berth:role"), Some("data"));
    assert_eq!(volume.availability_zone(), Some(zone.as_str()));
    assert_eq!(
        volume.attachments().first().and_then(|a| a.instance_id()),
        vm.instance_id()
    );
    (vm, volume)
}

/// The security group opens 5432 and, with ssh keys, 22; nothing else.
async fn assert_only_postgres_and_ssh_are_open(client: &Client, id: &str) {
    let groups = security_groups(client, id).await;
    assert_eq!(groups.len(), 1);
    let mut ports: Vec<i32> = groups[0]
        .ip_permissions()
        .iter()
        .filter_map(|p| p.from_port())
        .collect();
    ports.sort();
    assert_eq!(ports, [22, 5432]);
}

/// Where a provision delivers its connection: the store's bucket and the callback's arguments file.
struct Delivered<'a> {
    store: &'a Peer,
    bucket: &'a str,
    args_file: &'a Path,
}

/// The connection landed in the bucket, and the callback got its 4 arguments.
async fn assert_the_connection_was_delivered(
    pool: &PgPool,
    delivered: &Delivered<'_>,
    id: &str,
    vm: &aws_sdk_ec2::types::Instance,
    details: &Value,
) {
    let store = delivered.store;
    let s3 = s3_client(&store.url, &store.key, &store.secret);
    let pushed = s3_json(&s3, delivered.bucket, "berth/pg-test.json").await;
    assert_eq!(pushed["instance_name"], "pg-test");
    assert_eq!(pushed["admin_user"], "app_admin");
    assert_eq!(pushed["admin_password"], admin_password(pool, id).await);
    assert_eq!(pushed["app_db_name"], "app");
    assert_eq!(pushed["ip_public"], details["host"]);
    assert_eq!(pushed["ip_private"], vm.private_ip_address().unwrap());
    assert!(pushed["connstr"].as_str().unwrap().contains(&format!(
        "@{}:5432/app?sslmode=require",
        details["host"].as_str().unwrap()
    )));
    let args = std::fs::read_to_string(delivered.args_file).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args.len(), 4, "{args:?}");
    assert_eq!(args[0], "pg-test");
    assert!(
        args[1].contains(vm.private_ip_address().unwrap())
            && args[2].contains(details["host"].as_str().unwrap())
    );
    assert_eq!(
        serde_json::from_str::<Value>(args[3]).unwrap(),
        json!({ "team": "data" })
    );
}

/// A retried provision whose first try crashed before recording anything adopts what exists.
async fn assert_a_retried_provision_adopts_what_exists(
    pool: &PgPool,
    services: &Arc<Services>,
    client: &Client,
    id: &str,
) {
    instances::set_details(pool, id, &json!({}), None)
        .await
        .unwrap();
    operate_ok(pool, services, Operation::Provision, id, None).await;
    assert_eq!(
        live_vms(client, id).await.len(),
        1,
        "a retried task makes one VM"
    );
    assert_eq!(data_volumes(client, id).await.len(), 1);
    assert_eq!(addresses(client, id).await.len(), 1);
}

/// A reconcile step under way (it holds the instance's lock) finishes before the teardown starts: a replacement
/// it launches must not escape the sweep. The teardown leaves nothing tagged.
async fn assert_the_teardown_waits_for_reconcile_and_leaves_nothing(
    pool: &PgPool,
    services: &Arc<Services>,
    client: &Client,
    id: &str,
) {
    let mut reconciling = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('berth.ec2:' || $1, 0))")
        .bind(id)
        .execute(&mut *reconciling)
        .await
        .unwrap();
    let teardown = {
        let (pool, services, id) = (pool.clone(), services.clone(), id.to_string());
        tokio::spawn(async move {
            operate(
                &pool,
                &services,
                Operation::Deprovision,
                &id,
                None,
                json!({}),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        live_vms(client, id).await.len(),
        1,
        "the teardown waits for the reconcile step"
    );
    reconciling.rollback().await.unwrap();

    succeeded(&teardown.await.unwrap());
    assert!(live_vms(client, id).await.is_empty());
    assert!(data_volumes(client, id).await.is_empty());
    assert!(addresses(client, id).await.is_empty());
    assert!(security_groups(client, id).await.is_empty());
    assert!(instances::get(pool, id).await.unwrap().is_none());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn each_strategy_launches_its_first_candidate(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let client = ec2(&peer);
    let services = services_with(&peer, json!({})).await;
    let base = json!({ "cpu_min": 2, "cpu_max": 4, "ram_max": 8, "cpu_arch": "x86_64" });
    let mut launched = Vec::new();
    for strategy in ["cheapest", "balanced", "random"] {
        let mut parameters = base.clone();
        parameters["selection_strategy"] = json!(strategy);
        let (id, details) = provision(&pool, &services, parameters.clone()).await;
        let state = &details["ec2"];
        let offers = ec2_offers::load_region(&pool, "us-east-1").await.unwrap();
        assert!(offers.len() > 100, "moto's instance types are cached");
        let mut requirements = Requirements::from_parameters(&parameters, true).unwrap();
        requirements.zone = state["zone"].as_str().map(str::to_string);
        let expected = candidates(&offers, &requirements, &[], &mut rand::thread_rng());
        let names = |list: &[Value]| {
            list.iter()
                .map(|c| c["instance_type"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let got = names(state["candidates"].as_array().unwrap());
        let want: Vec<String> = expected.iter().map(|c| c.instance_type.clone()).collect();
        if strategy == "random" {
            let (mut a, mut b) = (got.clone(), want.clone());
            a.sort();
            b.sort();
            assert_eq!(a, b, "random orders the same candidates");
        } else {
            assert_eq!(got, want, "{strategy} orders as broker::ec2 does");
        }
        let vm = live_vms(&client, &id).await;
        assert_eq!(
            vm[0].instance_type().unwrap().as_str(),
            got[0],
            "{strategy} launches its first candidate"
        );
        launched.push(got);
        operate(
            &pool,
            &services,
            Operation::Deprovision,
            &id,
            None,
            json!({}),
        )
        .await;
    }
    assert!(launched.iter().all(|c| !c.is_empty()));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_evicted_vm_is_replaced_in_the_volume_zone(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let client = ec2(&peer);
    let services = services_with(&peer, json!({})).await;
    let (id, details) = provision(
        &pool,
        &services,
        json!({ "cpu_min": 2, "cpu_max": 2, "public_ip": true }),
    )
    .await;
    let old = details["ec2"].clone();
    let old_vm = old["vm_id"].as_str().unwrap().to_string();

    // A bound app, as a bind leaves it (bind itself needs a Postgres that answers, which moto's VM has not).
    let binding = new_binding(&pool, &id, SPOT, json!({})).await;
    store_bound_credentials(&pool, &binding, details["host"].as_str().unwrap()).await;

    // The spot VM goes away (moto cannot interrupt spot; a termination looks the same to berth).
    client
        .terminate_instances()
        .instance_ids(&old_vm)
        .send()
        .await
        .unwrap();
    let state = eventually(Duration::from_secs(30), "a running replacement", || {
        let (pool, services) = (pool.clone(), services.clone());
        let (id, old_vm) = (id.clone(), old_vm.clone());
        async move {
            berth_worker::reconcile::once(&pool, &services).await;
            let details = crate::helpers::details(&pool, &id).await;
            let state = details["ec2"].clone();
            (state["recovering"] == false && state["vm_id"].as_str().is_some_and(|v| v != old_vm))
                .then_some(details)
        }
    })
    .await;
    let new = &state["ec2"];
    let vms = live_vms(&client, &id).await;
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].instance_id(), new["vm_id"].as_str());
    assert_eq!(
        vms[0].placement().unwrap().availability_zone(),
        old["zone"].as_str(),
        "the volume's zone"
    );
    let volumes = data_volumes(&client, &id).await;
    assert_eq!(volumes.len(), 1, "the same volume, not a new one");
    assert_eq!(volumes[0].volume_id(), old["volume_id"].as_str());
    assert_eq!(
        volumes[0]
            .attachments()
            .first()
            .and_then(|a| a.instance_id()),
        new["vm_id"].as_str()
    );
    assert_eq!(state["recoveries"], 1);
    // It lived under five minutes: its type now comes last.
    let short = old["instance_type"].as_str().unwrap();
    assert_eq!(new["short_lived_types"], json!([short]));
    assert_eq!(
        new["candidates"].as_array().unwrap().last().unwrap()["instance_type"],
        short
    );

    // The binding now names the new host.
    let new_host = vms[0].public_ip_address().unwrap();
    assert_eq!(state["host"], new_host);
    let row = bindings::get(&pool, &binding).await.unwrap().unwrap();
    let now = credentials(&pool, &binding).await;
    assert!(
        now["DATABASE_URL"]
            .as_str()
            .unwrap()
            .contains(&format!("@{new_host}:5432/")),
        "{now:?}"
    );
    assert_eq!(now["PGHOST"], new_host);
    assert_eq!(row.details["endpoints"][0]["host"], new_host);

    // expiration_date tears it down by itself: the reconcile loop enqueues the deprovision.
    sqlx::query(
        "UPDATE service_instances SET parameters = parameters || '{\"expiration_date\": \"2020-01-01\"}' WHERE id = $1",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();
    berth_worker::reconcile::once(&pool, &services).await;
    drain_all(&pool, &services).await;
    assert!(instances::get(&pool, &id).await.unwrap().is_none());
    assert!(live_vms(&client, &id).await.is_empty());
    assert!(data_volumes(&client, &id).await.is_empty());
}

/// Stores a bound app's credentials and endpoints for `host`, as a bind leaves them.
async fn store_bound_credentials(pool: &PgPool, binding: &str, host: &str) {
    let mut credentials = Map::new();
    credentials.insert(
        "DATABASE_URL".into(),
        json!(format!("postgres://r:p@{host}:5432/app?sslmode=require")),
    );
    credentials.insert("PGHOST".into(), json!(host));
    bindings::set_credentials(
        pool,
        binding,
        &json!({ "endpoints": [{ "host": host }] }),
        Some(&cipher().seal_json(&credentials)),
    )
    .await
    .unwrap();
}

fn write_script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn the_callback_is_killed_at_its_limit_with_its_children() {
    let dir = std::env::temp_dir().join(format!("berth-cb-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("pid");
    let script = write_script(
        &dir,
        "slow.sh",
        &format!("sleep 60 &\necho $! > {}\nwait\n", pid_file.display()),
    );
    let started = std::time::Instant::now();
    let args = [
        "pg1".to_string(),
        "postgresql://a".to_string(),
        String::new(),
        "{}".to_string(),
    ];
    let err = berth_worker::delivery::run_callback(&script, &args, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("killed"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    eventually(
        Duration::from_secs(5),
        "the callback's child to be gone",
        || {
            let gone = !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "));
            async move { gone.then_some(()) }
        },
    )
    .await;
    // A quick one with 4 arguments succeeds; a failing one reports its status.
    let ok = write_script(&dir, "ok.sh", "[ $# -eq 4 ]\n");
    berth_worker::delivery::run_callback(&ok, &args, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        berth_worker::delivery::run_callback(&ok, &args[..3], Duration::from_secs(5))
            .await
            .is_err()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A stand-in for EC2 in front of moto: RunInstances of `blocked` fails with InsufficientInstanceCapacity (moto
/// never runs out), everything else goes through unchanged (same Host header, so moto's signature check holds).
async fn capacity_proxy(
    moto_url: String,
    blocked: &'static str,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::{body::Bytes, extract::Request, http::StatusCode, response::IntoResponse};
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = refused.clone();
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |request: Request| {
        let (http, moto_url, counter) = (http.clone(), moto_url.clone(), counter.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body: Bytes = axum::body::to_bytes(body, 1 << 24).await.unwrap();
            let text = String::from_utf8_lossy(&body);
            if text.contains("Action=RunInstances") && text.contains(&format!("InstanceType={blocked}")) {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let xml = "<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>none left\
                           </Message></Error></Errors><RequestID>x</RequestID></Response>";
                return (StatusCode::BAD_REQUEST, xml).into_response();
            }
            let url = format!("{moto_url}{}", parts.uri.path_and_query().map_or("/", |p| p.as_str()));
            let mut forward = http.request(parts.method.clone(), url).body(body.to_vec());
            for (name, value) in &parts.headers {
                forward = forward.header(name, value);
            }
            let answer = forward.send().await.unwrap();
            let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
            let content_type = answer.headers().get("content-type").cloned();
            let bytes = answer.bytes().await.unwrap();
            let mut response = (status, bytes).into_response();
            if let Some(content_type) = content_type {
                response.headers_mut().insert("content-type", content_type);
            }
            response
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, refused)
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_type_without_capacity_gives_way_to_the_next(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let client = ec2(&peer);
    let (proxy, refused) = capacity_proxy(peer.url.clone(), "m5.large").await;
    let services = services_with(
        &Peer {
            url: proxy,
            key: peer.key.clone(),
            secret: peer.secret.clone(),
        },
        json!({}),
    )
    .await;
    let (id, details) = provision(
        &pool,
        &services,
        json!({ "instance_types": ["m5.xlarge", "m5.large"], "selection_strategy": "cheapest" }),
    )
    .await;
    let state = &details["ec2"];
    assert_eq!(
        state["candidates"][0]["instance_type"], "m5.large",
        "the smaller one comes first"
    );
    assert!(
        refused.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "m5.large was tried"
    );
    assert_eq!(state["candidate_index"], 1);
    let vms = live_vms(&client, &id).await;
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].instance_type().unwrap().as_str(), "m5.xlarge");
    operate(
        &pool,
        &services,
        Operation::Deprovision,
        &id,
        None,
        json!({}),
    )
    .await;
    assert!(data_volumes(&client, &id).await.is_empty());
}

/// Warm-pool items of `dedicated-spot` (docs/pools.md): the fill records its progress on the item's row and tags
/// everything with the item's id; an item whose VM is interrupted while it waits is removed by the reconcile
/// pass, leaving nothing; a take whose VM went before that pass saw it tears the item down and provisions the
/// instance the ordinary way, with passwords of its own.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn pooled_vms_that_went_are_removed_or_replaced_by_the_ordinary_path(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let client = ec2(&peer);
    let services = services_with(&peer, json!({ "pool_targets": "dedicated-spot=2" })).await;
    let checked = berth_worker::pools::check(&pool, &services).await.unwrap();
    assert_eq!(checked.fills, 2);
    drain_all(&pool, &services).await;
    let items: Vec<pools::PoolItem> = pools::list(&pool).await.unwrap();
    assert!(
        items.len() == 2 && items.iter().all(|i| i.state == pools::READY),
        "{items:?}"
    );
    let vm_of = |item: &pools::PoolItem| item.details["ec2"]["vm_id"].as_str().unwrap().to_string();
    for item in &items {
        let vms = live_vms(&client, &item.id).await;
        assert_eq!(vms.len(), 1, "{}", item.id);
        assert_eq!(vms[0].instance_id(), Some(vm_of(item).as_str()));
        assert_eq!(data_volumes(&client, &item.id).await.len(), 1);
    }

    // Interrupted while pooled: the reconcile pass marks the item for removal, its pool.remove leaves nothing.
    let (interrupted, taken) = (&items[0], &items[1]);
    terminate(&client, &vm_of(interrupted)).await;
    reconcile_removes(&pool, &services, &interrupted.id, &taken.id).await;
    drain_all(&pool, &services).await;
    assert!(pools::get(&pool, &interrupted.id).await.unwrap().is_none());
    assert!(live_vms(&client, &interrupted.id).await.is_empty());
    assert!(data_volumes(&client, &interrupted.id).await.is_empty());

    // Taken (as the API's claim takes it) after its VM went: the item is torn down, the instance provisioned.
    terminate(&client, &vm_of(taken)).await;
    let (claimed, id) = take_from_pool(&pool, SPOT, json!({"admin_user": "boss"})).await;
    assert_eq!(claimed.id, taken.id);
    operate_ok(&pool, &services, Operation::Provision, &id, None).await;
    let details = details(&pool, &id).await;
    assert_eq!(details["pool_fell_back"], true, "{details}");
    assert_eq!(details["admin_user"], "boss");
    let vms = live_vms(&client, &id).await;
    assert_eq!(vms.len(), 1);
    assert_ne!(vms[0].instance_id(), Some(vm_of(taken).as_str()));
    assert_eq!(details["ec2"]["vm_id"].as_str(), vms[0].instance_id());
    assert!(live_vms(&client, &taken.id).await.is_empty());
    assert!(data_volumes(&client, &taken.id).await.is_empty());
    let pooled: Value = cipher().open_json(taken.secrets.as_ref().unwrap()).unwrap();
    assert_ne!(
        admin_password(&pool, &id).await,
        pooled["admin_password"].as_str().unwrap(),
        "a password made while pooled survived"
    );

    operate_ok(&pool, &services, Operation::Deprovision, &id, None).await;
    assert!(live_vms(&client, &id).await.is_empty());
    assert!(data_volumes(&client, &id).await.is_empty());
}

pub(crate) async fn terminate(client: &Client, vm: &str) {
    client
        .terminate_instances()
        .instance_ids(vm)
        .send()
        .await
        .unwrap();
}

/// A pool item of `plan` taken as the API's claim takes it: the item's details (marked `pool_item`) and secrets
/// become a new instance's, asked for with `parameters`. Returns the item and the instance's id.
pub(crate) async fn take_from_pool(
    pool: &PgPool,
    plan: &str,
    parameters: Value,
) -> (pools::ClaimedItem, String) {
    let claimed = pools::claim(pool, plan, None).await.unwrap().unwrap();
    let id = insert_instance(pool, POSTGRES, plan, json!({}), parameters).await;
    let mut claimed_details = claimed.details.clone();
    claimed_details["pool_item"] = json!(claimed.id);
    instances::set_details(pool, &id, &claimed_details, claimed.secrets.as_deref())
        .await
        .unwrap();
    (claimed, id)
}

/// One reconcile pass: `lost` (an item whose VM went) is marked for removal, `kept` stays ready.
pub(crate) async fn reconcile_removes(
    pool: &PgPool,
    services: &Arc<Services>,
    lost: &str,
    kept: &str,
) {
    berth_worker::reconcile::once(pool, services).await;
    let state = |id: &str| {
        let id = id.to_string();
        async move { pools::get(pool, &id).await.unwrap().map(|i| i.state) }
    };
    assert_eq!(
        state(lost).await,
        Some(pools::REMOVING.to_string()),
        "the reconcile pass did not remove the item"
    );
    assert_eq!(
        state(kept).await,
        Some(pools::READY.to_string()),
        "an item whose VMs run stays"
    );
}
