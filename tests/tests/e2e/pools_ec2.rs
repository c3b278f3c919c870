//! Warm pools of the `ec2` engine (docs/pools.md) on VMs that boot under the VM emulator (docs/vm-emulator.md):
//! a worker killed while it fills an item leaves the fill to another, which finishes the same VM; a provision
//! takes the ready item in seconds, its resources get the instance's tags, its names and passwords are the
//! instance's (the item's superuser password is refused); deprovision leaves nothing in moto or in docker; a
//! pooled VM interrupted while it waits is removed by the reconcile loop and replaced; a worker restarted with
//! the target at 0 removes a ready item and its VM. Three VM boots in all.

use std::time::{Duration, Instant};

use berth_tests::{Stack, TestFolder, plan_ids, repo_dir};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::{
    dedicated_spot_vm::{aws, container_runs, docker, env, setup_log, tagged},
    pools::{Item, body, drain_by_restart, metrics, pool_items, provision_sync, sample, wait_pool},
};

/// This test's VPC: a CIDR no other test uses (docs/vm-emulator.md).
const CIDR: &str = "10.203.0.0/16";
/// A boot, cloud-init and initdb on a busy 2-core machine, plus the engine's polling; leave room.
const WAIT: Duration = Duration::from_secs(600);

fn container_gone(vm: &str) -> bool {
    docker(&["inspect", &format!("{}-{vm}", env("BERTH_TEST_VM_NAME"))]).is_none()
}

/// A copy of the plans in which `plan` (of the postgres service) defaults to PostgreSQL 15, the VM image's (its
/// VMs cannot install another): pool items are made with the plan's defaults. Returns the folder.
pub(crate) fn plans_on_the_image_version(folder: &TestFolder, plan: &str) -> String {
    let dir = folder.0.join("plans");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(repo_dir().join("plans")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let file = dir.join("postgres.json");
    let mut service: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let plan = service["plans"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["name"] == plan)
        .unwrap();
    plan["schemas"]["service_instance"]["create"]["parameters"]["properties"]["postgres_version"]
        ["default"] = json!("15");
    std::fs::write(&file, serde_json::to_string_pretty(&service).unwrap()).unwrap();
    dir.display().to_string()
}

/// Nothing tagged `berth:instance=<key>` is left in moto.
pub(crate) fn assert_nothing_tagged(key: &str) {
    let held = tagged(key);
    for kind in ["vms", "volumes", "addresses", "security_groups"] {
        assert_eq!(
            held[kind],
            json!([]),
            "moto still holds {kind} of {key}: {held}"
        );
    }
}

/// The superuser connection to a VM's server over TLS.
fn superuser_url(host: &str, password: &str) -> String {
    format!("postgres://berth_su:{password}@{host}:5432/postgres?sslmode=require")
}

/// Seconds between an item's creation and its `ready_at` (what the fill, the ordinary provision's steps, took).
pub(crate) async fn fill_seconds(stack: &Stack, item: &str) -> f64 {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM ready_at - created_at)::float8 FROM pool_items WHERE id = $1",
    )
    .bind(item)
    .fetch_one(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    seconds
}

#[tokio::test]
async fn ec2_pool_item_survives_a_killed_filler_is_taken_in_seconds_and_drains() {
    assert_eq!(
        env("BERTH_TEST_VM_EMULATOR"),
        "1",
        "the VM emulator is not running"
    );
    let vpc = aws(&["vpc", CIDR, "pools-ec2"]);
    let subnets: Vec<&str> = vpc["subnets"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s.as_str().unwrap())
        .collect();
    let folder = TestFolder(
        std::env::temp_dir().join(format!("berth-pools-ec2-{}", uuid::Uuid::new_v4().simple())),
    );
    let plans_dir = plans_on_the_image_version(&folder, "dedicated-spot");
    let mut stack = Stack::start_with(vec![
        ("PLANS_DIR", plans_dir),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", env("BERTH_TEST_MOTO_URL")),
        ("AWS_ACCESS_KEY_ID", env("BERTH_TEST_MOTO_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY", env("BERTH_TEST_MOTO_SECRET_KEY")),
        ("EC2_AMI_X86_64", vpc["ami_x86_64"].as_str().unwrap().into()),
        ("EC2_AMI_ARM64", vpc["ami_arm64"].as_str().unwrap().into()),
        ("EC2_SUBNET_IDS", subnets.join(",")),
        ("EC2_READINESS_PROBE", "true".into()),
        ("POOL_TARGETS", "dedicated-spot=1".into()),
        ("POOL_CHECK_MS", "500".into()),
        // The killed worker's fill comes back to the queue soon.
        ("WORKER_LEASE_SECS", "5".into()),
    ])
    .await
    .unwrap();
    let ids = plan_ids(
        &stack.catalog().await.unwrap(),
        "postgres",
        "dedicated-spot",
    );
    let cipher = broker::crypto::Cipher::from_key_files(&[stack.dir.join("master.key")]).unwrap();

    // A worker killed once the item's VM is launched: the fill's progress is on the item's row, so another
    // worker finishes the same item with the same VM.
    let deadline = Instant::now() + WAIT;
    let filling: Item = loop {
        let items = pool_items(&stack, &ids.1).await;
        if let Some(item) = items
            .iter()
            .find(|i| i.state == "filling" && i.details["ec2"]["vm_id"].is_string())
        {
            break item.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no fill seen launching its VM: {items:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let vm_id = filling.details["ec2"]["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        filling.details["ec2"]["volume_id"].is_string()
            && filling.details["ec2"]["security_group_id"].is_string(),
        "the item's row holds the fill's progress: {}",
        filling.details
    );
    stack.kill_worker().await;
    stack.restart_worker(Vec::new()).unwrap();
    let item = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    assert_eq!(item.id, filling.id, "the killed fill was not finished");
    assert_eq!(
        item.details["ec2"]["vm_id"],
        vm_id.as_str(),
        "{}",
        item.details
    );
    let held = tagged(&item.id);
    let vms = held["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "one VM for the item: {held}");
    assert_eq!(vms[0]["id"], vm_id.as_str());
    assert_eq!(
        held["security_groups"].as_array().unwrap().len(),
        1,
        "{held}"
    );
    assert!(container_runs(&vm_id), "the item's VM does not run");

    // The item's server answers its superuser over TLS, with the password it was made with.
    let host = item.details["host"].as_str().unwrap().to_string();
    let pooled: Value = cipher.open_json(item.secrets.as_ref().unwrap()).unwrap();
    let pooled_superuser = pooled["superuser_password"].as_str().unwrap().to_string();
    PgConnection::connect(&superuser_url(&host, &pooled_superuser))
        .await
        .unwrap_or_else(|e| panic!("the pooled server answers: {e}\n{}", setup_log(&vm_id)))
        .close()
        .await
        .unwrap();

    // A provision takes it: names, extensions and tags the finishing step applies.
    let instance = uuid::Uuid::new_v4().to_string();
    let base = format!("/v2/service_instances/{instance}");
    let provision = json!({
        "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
        "parameters": { "app_db_name": "shop", "admin_user": "boss", "extensions": ["pgcrypto"],
                        "tags": { "team": "pools" } },
    });
    let started = Instant::now();
    stack.put_until_done(&base, &provision, WAIT).await;
    let pooled_take = started.elapsed();
    assert!(
        pooled_take < Duration::from_secs(30),
        "a pooled take took {pooled_take:?}\n{}",
        stack.logs()
    );
    for line in stack
        .log("worker-restarted.log")
        .lines()
        .filter(|l| l.contains("pooled VM adopted"))
    {
        println!("{line}");
    }
    let details = stack.instance_details(&instance).await;
    assert_eq!(details["pool_item"], item.id.as_str(), "{details}");
    assert_eq!(
        details["ec2"]["vm_id"],
        vm_id.as_str(),
        "the item's VM: {details}"
    );
    assert_eq!(details["app_db_name"], "shop");
    assert_eq!(details["admin_user"], "boss");
    assert_eq!(
        details["postgres_version"], "15",
        "the plan's default: {details}"
    );
    // A miss: a parameter that shapes the VM takes the ordinary path, which a client that cannot poll is refused
    // (422 AsyncRequired, nothing written; no VM boots for it here).
    let missed = uuid::Uuid::new_v4().to_string();
    let (status, answer) =
        provision_sync(&stack, &missed, &body(&ids, json!({ "cpu_min": 4 }))).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (422, Some("AsyncRequired")),
        "{answer}"
    );
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "berth_pool_hits_total", "dedicated-spot", ""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "berth_pool_misses_total", "dedicated-spot", ""),
        Some(1.0),
        "{text}"
    );

    // The item's resources carry the instance's tags now; nothing is left under the item's.
    let held = tagged(&instance);
    let vms = held["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{held}");
    assert_eq!(vms[0]["id"], vm_id.as_str());
    assert_eq!(vms[0]["tags"]["team"], "pools", "{held}");
    assert!(
        vms[0]["tags"]["Name"]
            .as_str()
            .is_some_and(|name| !name.is_empty()),
        "{held}"
    );
    assert!(!held["volumes"].as_array().unwrap().is_empty(), "{held}");
    assert_eq!(
        held["security_groups"].as_array().unwrap().len(),
        1,
        "{held}"
    );
    assert_nothing_tagged(&item.id);

    // A binding connects to the renamed database and writes; the item's superuser password is refused.
    let binding = format!("{base}/service_bindings/app");
    stack
        .put_until_done(
            &binding,
            &json!({ "service_id": ids.0, "plan_id": ids.1 }),
            WAIT,
        )
        .await;
    let url = stack.fetch_credentials(&binding).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url.contains("/shop?"), "{url}");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE kept (id int PRIMARY KEY, digest text); \
         INSERT INTO kept VALUES (1, encode(digest('x', 'sha256'), 'hex'))",
    )
    .execute(&mut conn)
    .await
    .expect("the binding writes, with the extension asked for");
    conn.close().await.unwrap();
    assert!(
        PgConnection::connect(&superuser_url(&host, &pooled_superuser))
            .await
            .is_err(),
        "the pooled superuser password still logs in"
    );
    let secrets: Value = {
        let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
        let sealed: Vec<u8> =
            sqlx::query_scalar("SELECT secrets FROM service_instances WHERE id = $1")
                .bind(&instance)
                .fetch_one(&mut db)
                .await
                .unwrap();
        db.close().await.unwrap();
        cipher.open_json(&sealed).unwrap()
    };
    assert!(secrets.get("pooled_superuser_password").is_none());
    PgConnection::connect(&superuser_url(
        &host,
        secrets["superuser_password"].as_str().unwrap(),
    ))
    .await
    .expect("the instance's superuser password logs in")
    .close()
    .await
    .unwrap();

    // Deprovision: nothing of the instance (nor of the item it was) is left in moto or in docker.
    let (status, _) = stack.delete_until_done(&binding, &ids, WAIT).await;
    assert!(status == 410 || status == 200, "unbind ended with {status}");
    let (status, last) = stack.delete_until_done(&base, &ids, WAIT).await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    assert_nothing_tagged(&instance);
    assert_nothing_tagged(&item.id);
    crate::dedicated_spot_vm::eventually(
        Duration::from_secs(60),
        "the instance's VM container is gone",
        || container_gone(&vm_id),
    )
    .await;

    // The pool was refilled meanwhile (the second boot). Its spot VM is interrupted while it waits: the
    // reconcile loop removes the item (nothing of it is left) and the pool is filled again (the third boot).
    let interrupted = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    let interrupted_vm = interrupted.details["ec2"]["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    let refill_seconds = fill_seconds(&stack, &interrupted.id).await;
    aws(&["terminate", &interrupted_vm]);
    let deadline = Instant::now() + WAIT;
    let refill = loop {
        let items = pool_items(&stack, &ids.1).await;
        if let [only] = items.as_slice()
            && only.id != interrupted.id
            && only.state == "ready"
        {
            break only.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the interrupted item was not replaced: {items:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_nothing_tagged(&interrupted.id);
    crate::dedicated_spot_vm::eventually(
        Duration::from_secs(60),
        "the interrupted item's VM container is gone",
        || container_gone(&interrupted_vm),
    )
    .await;

    // A worker restarted with the target at 0 drains the pool: the ready item and its VM go.
    let refill_vm = refill.details["ec2"]["vm_id"].as_str().unwrap().to_string();
    drain_by_restart(&mut stack, &ids.1, "dedicated-spot=0", WAIT).await;
    assert_nothing_tagged(&refill.id);
    crate::dedicated_spot_vm::eventually(
        Duration::from_secs(60),
        "the drained item's VM container is gone",
        || container_gone(&refill_vm),
    )
    .await;
    aws(&["delete-vpc", vpc["vpc"].as_str().unwrap()]);
    stack.stop().await;

    println!(
        "bench dedicated-spot pool on the VM emulator: a pooled take PUT→last_operation succeeded {:.1} s; \
         the refill (the ordinary provision's steps, item created→ready) {refill_seconds:.1} s (same run)",
        pooled_take.as_secs_f64()
    );
}
