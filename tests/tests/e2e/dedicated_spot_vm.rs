//! `dedicated-spot` on VMs that boot: moto's instances run as systemd containers under the VM emulator
//! (docs/vm-emulator.md; scripts/test.sh starts it beside moto). The cloud-init user-data sets PostgreSQL up on
//! the data volume, the readiness probe really connects, a spot interruption (TerminateInstances on moto) is
//! recovered on a new VM with the volume re-attached, and teardown leaves nothing in moto or in docker. Without
//! the emulator the test fails; it is never skipped.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use berth_tests::{Stack, TestFolder, plan_ids, repo_dir};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// This test's VPC: a CIDR no other test uses (docs/vm-emulator.md).
const CIDR: &str = "10.201.0.0/16";
/// A boot, cloud-init and initdb on a busy 2-core machine, plus the engine's polling; leave room.
const WAIT: Duration = Duration::from_secs(600);
const INSTANCE_NAME: &str = "spot-vm";
const ROWS: i64 = 100;

pub(crate) fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs moto, SeaweedFS and the VM emulator, which scripts/test.sh \
             starts (docs/vm-emulator.md)"
        )
    })
}

/// scripts/vm-emulator/aws_helper.py: the test's hands on moto's EC2 and on the S3 store.
pub(crate) fn aws(args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(repo_dir().join("scripts/vm-emulator/aws_helper.py"))
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "aws_helper.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("aws_helper.py prints JSON")
}

/// `docker ARGS` against the emulator's engine; its output, or `None` when it failed.
pub(crate) fn docker(args: &[&str]) -> Option<String> {
    let out = Command::new("docker")
        .env("DOCKER_HOST", env("BERTH_TEST_VM_DOCKER_HOST"))
        .args(args)
        .output()
        .expect("the docker client runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn container(vm: &str) -> String {
    format!("{}-{vm}", env("BERTH_TEST_VM_NAME"))
}

pub(crate) fn container_runs(vm: &str) -> bool {
    docker(&["inspect", "-f", "{{.State.Running}}", &container(vm)]).as_deref() == Some("true")
}

/// The VM's setup log (from the running VM, else the copy the emulator kept), for failure messages.
pub(crate) fn setup_log(vm: &str) -> String {
    docker(&["exec", &container(vm), "cat", "/var/log/berth-setup.log"])
        .or_else(|| {
            let kept = PathBuf::from(env("BERTH_TEST_VM_STATE_DIR"))
                .join("vms")
                .join(vm)
                .join("berth-setup.log");
            std::fs::read_to_string(kept).ok()
        })
        .unwrap_or_else(|| format!("(no setup log of {vm})"))
}

pub(crate) fn emulator_status() -> Value {
    let path = PathBuf::from(env("BERTH_TEST_VM_STATE_DIR")).join("status.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or_default()
}

/// Polls `check` every half second until it holds, or panics with `what` after `limit`.
pub(crate) async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} (after {limit:?})");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What moto holds for the instance (VMs not terminated, volumes, addresses, security groups).
pub(crate) fn tagged(instance: &str) -> Value {
    aws(&["tagged", instance])
}

fn the_vm(instance: &str) -> Value {
    let held = tagged(instance);
    let vms = held["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{held}");
    vms[0].clone()
}

#[tokio::test]
async fn dedicated_spot_boots_survives_an_interruption_and_leaves_nothing() {
    assert_eq!(
        env("BERTH_TEST_VM_EMULATOR"),
        "1",
        "the VM emulator is not running"
    );
    let vpc = aws(&["vpc", CIDR, "dedicated-spot"]);
    let subnets: Vec<&str> = vpc["subnets"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s.as_str().unwrap())
        .collect();
    let folder = TestFolder(
        std::env::temp_dir().join(format!("berth-spot-vm-{}", uuid::Uuid::new_v4().simple())),
    );
    std::fs::create_dir_all(&folder.0).unwrap();
    let args_file = folder.0.join("callback-args");
    let callback = folder.0.join("callback.sh");
    std::fs::write(
        &callback,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\n",
            args_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &callback,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let store = (
        env("BERTH_TEST_S3_COMPAT_URL"),
        env("BERTH_TEST_S3_COMPAT_ACCESS_KEY"),
        env("BERTH_TEST_S3_COMPAT_SECRET_KEY"),
    );
    let bucket = format!("connstr-{}", uuid::Uuid::new_v4().simple());
    aws(&["s3-bucket", &store.0, &store.1, &store.2, &bucket]);

    let stack = Stack::start_with(vec![
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", env("BERTH_TEST_MOTO_URL")),
        ("AWS_ACCESS_KEY_ID", env("BERTH_TEST_MOTO_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY", env("BERTH_TEST_MOTO_SECRET_KEY")),
        ("EC2_AMI_X86_64", vpc["ami_x86_64"].as_str().unwrap().into()),
        ("EC2_AMI_ARM64", vpc["ami_arm64"].as_str().unwrap().into()),
        ("EC2_SUBNET_IDS", subnets.join(",")),
        ("EC2_READINESS_PROBE", "true".into()),
        ("CONNSTR_BUCKET", bucket.clone()),
        ("CONNSTR_BUCKET_KEY", "berth/{instance_name}.json".into()),
        ("CONNSTR_BUCKET_ENDPOINT", store.0.clone()),
        ("CONNSTR_BUCKET_ACCESS_KEY", store.1.clone()),
        ("CONNSTR_BUCKET_ACCESS_SECRET", store.2.clone()),
        ("SETUP_FINISHED_CALLBACK", callback.display().to_string()),
    ])
    .await
    .unwrap();
    let catalog = stack.catalog().await.unwrap();
    let spot = plan_ids(&catalog, "postgres", "dedicated-spot");
    let delivered = Delivered {
        store: &store,
        bucket: &bucket,
        args_file: &args_file,
    };

    // Launch → ready: the VM boots, cloud-init sets PostgreSQL up, the readiness probe connects over TLS.
    let instance = uuid::Uuid::new_v4().to_string();
    let base = format!("/v2/service_instances/{instance}");
    let provision = json!({
        "service_id": spot.0, "plan_id": spot.1, "organization_guid": "org", "space_guid": "space",
        "context": { "platform": "cloudfoundry", "instance_name": INSTANCE_NAME },
        "parameters": { "postgres_version": "15", "static_ip": true, "storage_min": 10,
                        "cpu_min": 2, "cpu_max": 4, "extensions": ["pgcrypto"] },
    });
    let launched = Instant::now();
    stack.put_until_done(&base, &provision, WAIT).await;
    let launch_to_ready = launched.elapsed();
    let details = stack.instance_details(&instance).await;
    // From RunInstances (the engine's `launched_at`) to the provision's end (`ready_at`): the VM's share, without
    // the offers refresh and the resources made before the launch.
    let vm_to_ready = details["ready_at"]
        .as_str()
        .and_then(chrono_seconds)
        .zip(details["ec2"]["launched_at"].as_i64())
        .map(|(ready, launched)| ready - launched as f64)
        .expect("ready_at and launched_at are recorded");
    let state = &details["ec2"];
    let vm = the_vm(&instance);
    let vm_id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(state["vm_id"], vm["id"], "{details}");
    assert_eq!(vm["lifecycle"], "spot", "{vm}");
    let private_ip = vm["private_ip"].as_str().unwrap().to_string();
    assert!(private_ip.starts_with("10.201."), "{vm}");
    assert_eq!(state["ip_private"], private_ip.as_str());
    let static_ip = state["static_ip"]
        .as_str()
        .expect("an Elastic IP")
        .to_string();
    assert_eq!(details["host"], static_ip.as_str(), "{details}");
    assert!(
        container_runs(&vm_id),
        "no running VM for {vm_id}: {}",
        emulator_status()
    );
    let log = setup_log(&vm_id);
    assert!(
        !log.contains("Reading package lists"),
        "the user-data installed packages the image has:\n{log}"
    );

    // Bind: DATABASE_URL names the Elastic IP and reaches PostgreSQL 15 on the VM over TLS.
    let binding = format!("{base}/service_bindings/app");
    let bind = json!({ "service_id": spot.0, "plan_id": spot.1, "app_guid": "app-1" });
    stack.put_until_done(&binding, &bind, WAIT).await;
    let url = stack.fetch_credentials(&binding).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        url.contains(&format!("@{static_ip}:5432/")) && url.ends_with("sslmode=require"),
        "{url}"
    );
    let mut conn = PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("DATABASE_URL connects: {e}\n{}", setup_log(&vm_id)));
    let (version, server): (String, String) =
        sqlx::query_as("SELECT version(), host(inet_server_addr())")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(version.starts_with("PostgreSQL 15"), "{version}");
    assert!(
        PgConnection::connect(&url.replace("sslmode=require", "sslmode=disable"))
            .await
            .is_err(),
        "a connection without TLS was accepted"
    );
    assert_eq!(server, private_ip, "the server runs on the VM");
    sqlx::raw_sql(&format!(
        "CREATE TABLE kept (id int PRIMARY KEY, digest text); \
         INSERT INTO kept SELECT n, encode(digest(n::text, 'sha256'), 'hex') FROM generate_series(1, {ROWS}) n"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    delivered.assert_addresses(&private_ip, &static_ip).await;

    // A spot interruption: moto terminates the VM, the emulator removes it; the reconcile loop launches a
    // replacement in the volume's zone, re-attaches the volume and moves the Elastic IP.
    let volume = {
        let held = tagged(&instance);
        assert_eq!(held["volumes"].as_array().unwrap().len(), 1, "{held}");
        held["volumes"][0].clone()
    };
    assert_eq!(volume["attached_to"], vm_id.as_str());
    let interrupted = Instant::now();
    aws(&["terminate", &vm_id]);
    eventually(
        Duration::from_secs(60),
        "the interrupted VM's container is gone",
        || docker(&["inspect", &container(&vm_id)]).is_none(),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    let rows = loop {
        if let Ok(mut conn) = PgConnection::connect(&url).await {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM kept")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "the binding did not work again after the interruption\n{}\n{}",
            stack.logs(),
            emulator_status()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let interruption_to_recovered = interrupted.elapsed();
    assert_eq!(
        rows, ROWS,
        "the rows written before the interruption are there"
    );
    let replacement = the_vm(&instance);
    let replacement_id = replacement["id"].as_str().unwrap().to_string();
    assert_ne!(replacement_id, vm_id);
    assert_eq!(
        replacement["zone"], volume["zone"],
        "recovered in the volume's zone"
    );
    let held = tagged(&instance);
    assert_eq!(held["volumes"][0]["id"], volume["id"], "{held}");
    assert_eq!(held["volumes"][0]["attached_to"], replacement_id.as_str());
    assert!(container_runs(&replacement_id));
    let new_private_ip = replacement["private_ip"].as_str().unwrap().to_string();
    let credentials = stack.fetch_credentials(&binding).await;
    assert_eq!(
        credentials["DATABASE_URL"],
        url.as_str(),
        "static_ip keeps DATABASE_URL"
    );
    let mut db = PgConnection::connect(&url).await.unwrap();
    let server: String = sqlx::query_scalar("SELECT host(inet_server_addr())")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(
        server, new_private_ip,
        "the server runs on the replacement VM"
    );
    sqlx::query("INSERT INTO kept VALUES ($1, 'after')")
        .bind(ROWS + 1)
        .execute(&mut db)
        .await
        .expect("the binding writes again");
    db.close().await.unwrap();
    let details = stack.instance_details(&instance).await;
    assert!(
        details["recoveries"].as_i64().unwrap_or(0) >= 1,
        "{details}"
    );
    assert_eq!(details["ec2"]["vm_id"], replacement_id.as_str());
    delivered
        .assert_addresses(&new_private_ip, &static_ip)
        .await;

    // The local engine's provision → ready in the same run, for the benchmark line.
    let local = plan_ids(&catalog, "postgres", "dedicated");
    let local_instance = format!("/v2/service_instances/{}", uuid::Uuid::new_v4());
    let started = Instant::now();
    stack
        .put_until_done(
            &local_instance,
            &json!({ "service_id": local.0, "plan_id": local.1, "organization_guid": "org",
                     "space_guid": "space", "parameters": {} }),
            WAIT,
        )
        .await;
    let local_ready = started.elapsed();
    let (status, _) = stack.delete_until_done(&local_instance, &local, WAIT).await;
    assert_eq!(status, 410);

    // Unbind and deprovision: nothing of the instance is left in moto or in docker.
    let (status, _) = stack.delete_until_done(&binding, &spot, WAIT).await;
    assert!(status == 410 || status == 200, "unbind ended with {status}");
    let (status, last) = stack.delete_until_done(&base, &spot, WAIT).await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    let held = tagged(&instance);
    for kind in ["vms", "volumes", "addresses", "security_groups"] {
        assert_eq!(held[kind], json!([]), "moto still holds {kind}: {held}");
    }
    let volume_id = volume["id"].as_str().unwrap().to_string();
    let loop_file = PathBuf::from(env("BERTH_TEST_VM_LOOP_DIR"))
        .join(format!("{}-{volume_id}.img", env("BERTH_TEST_VM_NAME")));
    let vpc_id = vpc["vpc"].as_str().unwrap().to_string();
    eventually(
        Duration::from_secs(30),
        "docker still holds a container, network or loop device of the instance",
        || {
            let status = emulator_status();
            [&vm_id, &replacement_id]
                .iter()
                .all(|vm| docker(&["inspect", &container(vm)]).is_none())
                && docker(&["network", "ls", "--format", "{{.Name}}"])
                    .is_some_and(|names| !names.contains(&vpc_id))
                && status["volumes"].get(&volume_id).is_none()
                && !loop_file.exists()
                && !loop_device_over(&loop_file)
        },
    )
    .await;
    aws(&["delete-vpc", &vpc_id]);
    stack.stop().await;

    println!(
        "bench dedicated-spot on the VM emulator: provision request→ready {:.1} s (VM launch→ready {vm_to_ready:.0} s), \
         interruption→recovered (the binding reads its rows again) {:.1} s; local dedicated provision→ready {:.1} s \
         (same run); anchor: pg-spot-operator ~150 s to setup completed on AWS",
        launch_to_ready.as_secs_f64(),
        interruption_to_recovered.as_secs_f64(),
        local_ready.as_secs_f64()
    );
}

/// Seconds since the epoch of an RFC 3339 time (`ready_at`).
fn chrono_seconds(text: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
}

/// Whether a loop device is still backed by `file`.
fn loop_device_over(file: &Path) -> bool {
    Command::new("losetup")
        .arg("-j")
        .arg(file)
        .output()
        .is_ok_and(|out| !out.stdout.is_empty())
}

/// Where the connection is delivered: the S3 store's bucket and the callback's arguments file.
struct Delivered<'a> {
    store: &'a (String, String, String),
    bucket: &'a str,
    args_file: &'a Path,
}

impl Delivered<'_> {
    /// The pushed connection JSON and the callback's arguments carry these addresses (polled: delivery follows
    /// the provision's or the recovery's commit).
    async fn assert_addresses(&self, private_ip: &str, public_ip: &str) {
        let key = format!("berth/{INSTANCE_NAME}.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new("python3")
                .arg(repo_dir().join("scripts/vm-emulator/aws_helper.py"))
                .args([
                    "s3-get",
                    &self.store.0,
                    &self.store.1,
                    &self.store.2,
                    self.bucket,
                    &key,
                ])
                .output()
                .unwrap();
            let pushed: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let args = std::fs::read_to_string(self.args_file).unwrap_or_default();
            let args: Vec<&str> = args.lines().collect();
            let pushed_ok = pushed["ip_private"] == private_ip
                && pushed["ip_public"] == public_ip
                && pushed["connstr"]
                    .as_str()
                    .is_some_and(|c| c.contains(&format!("@{public_ip}:5432/")));
            let args_ok = args.len() == 4
                && args[0] == INSTANCE_NAME
                && args[1].contains(&format!("@{private_ip}:5432/"))
                && args[2].contains(&format!("@{public_ip}:5432/"));
            if pushed_ok && args_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the delivered connection lacks {private_ip} / {public_ip}: pushed {pushed}, callback {args:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
