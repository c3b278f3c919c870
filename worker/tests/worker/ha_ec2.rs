//! The `ha` plan on the `ha_ec2` engine (`HA_ENGINE=ec2`) against moto (started by `scripts/test.sh`, IAM
//! enforced), with the readiness probe off since nothing runs on moto's VMs: the VMs, their spread over zones,
//! each member's user-data, idempotent retries, replacement of a lost member, scaling and teardown, and warm-pool
//! clusters that lost a member (removed while pooled, or replaced by the ordinary path at the take).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use aws_sdk_ec2::{Client, types::Instance};
use berth_worker::Services;
use broker::{
    db::{instances, pools},
    model::Operation,
};
use serde_json::{Value, json};
use sqlx::{PgPool, postgres::PgConnectOptions};

use crate::{
    ec2::{
        data_volumes, live_vms, reconcile_removes, security_groups, services_with, tag, tagged,
        take_from_pool, terminate, user_data, zone,
    },
    helpers::*,
    peers::{ec2_client as ec2, moto},
};

const HA: &str = "82d9fed1-cf5e-4477-8b7e-9a78f10e59b3";

async fn ha_services() -> (Arc<Services>, Client) {
    let peer = moto();
    let services = services_with(&peer, json!({ "ha_engine": "ec2" })).await;
    (services, ec2(&peer))
}

async fn provision(pool: &PgPool, services: &Arc<Services>, parameters: Value) -> (String, Value) {
    let id = new_instance(pool, HA, parameters).await;
    operate_ok(pool, services, Operation::Provision, &id, None).await;
    (id.clone(), details(pool, &id).await)
}

async fn update_members(pool: &PgPool, services: &Arc<Services>, id: &str, parameters: Value) {
    let payload = update_payload(HA, parameters, json!({}));
    update_ok(pool, services, id, payload).await;
}

/// The cluster's live VMs by member slot.
async fn members(client: &Client, id: &str) -> BTreeMap<String, Instance> {
    live_vms(client, id)
        .await
        .into_iter()
        .map(|vm| {
            (
                tag(vm.tags(), "berth:member")
                    .expect("a member tag")
                    .to_string(),
                vm,
            )
        })
        .collect()
}

fn state_member<'a>(details: &'a Value, name: &str) -> &'a Value {
    details["ha_ec2"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no member {name} in {details}"))
}

async fn tagged_count(client: &Client, id: &str) -> (usize, usize, usize, usize) {
    let interfaces = client
        .describe_network_interfaces()
        .filters(tagged(id))
        .send()
        .await
        .unwrap()
        .network_interfaces()
        .len();
    let volumes = client
        .describe_volumes()
        .filters(tagged(id))
        .send()
        .await
        .unwrap()
        .volumes()
        .len();
    let groups = client
        .describe_security_groups()
        .filters(tagged(id))
        .send()
        .await
        .unwrap()
        .security_groups()
        .len();
    let addresses = client
        .describe_addresses()
        .filters(tagged(id))
        .send()
        .await
        .unwrap()
        .addresses()
        .len();
    (interfaces, volumes, groups, addresses)
}

async fn deprovision_leaves_nothing(
    pool: &PgPool,
    services: &Arc<Services>,
    client: &Client,
    id: &str,
) {
    operate_ok(pool, services, Operation::Deprovision, id, None).await;
    assert!(live_vms(client, id).await.is_empty(), "no VM left");
    assert_eq!(
        tagged_count(client, id).await,
        (0, 0, 0, 0),
        "no interface, volume, security group or address left"
    );
    assert!(instances::get(pool, id).await.unwrap().is_none());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn three_members_over_three_zones_each_with_its_own_user_data(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let (services, client) = ha_services().await;
    let (id, details) = provision(
        &pool,
        &services,
        json!({ "cpu_min": 2, "cpu_max": 2, "storage_min": 12, "public_ip": true, "tags": { "team": "data" } }),
    )
    .await;
    let vms = members(&client, &id).await;
    assert_eq!(vms.keys().collect::<Vec<_>>(), ["m1", "m2", "m3"]);
    let mut zones: Vec<String> = vms.values().map(zone).collect();
    zones.dedup();
    assert_eq!(zones.len(), 3, "one member per zone: {zones:?}");
    assert_eq!(details["members"].as_array().unwrap().len(), 3);

    let peers: Vec<(String, String)> = ["m1", "m2", "m3"]
        .iter()
        .map(|m| {
            (
                m.to_string(),
                state_member(&details, m)["private_ip"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    for (name, vm) in &vms {
        let member = state_member(&details, name);
        assert_member_vm(&client, vm, name, member, &id, &peers).await;
    }
    let volumes = data_volumes(&client, &id).await;
    assert_eq!(volumes.len(), 3);
    assert!(
        volumes
            .iter()
            .all(|v| v.encrypted() == Some(true) && v.size() == Some(12))
    );
    assert_members_only_talk_to_each_other(&client, &id).await;

    // Secrets are sealed, never in the details.
    let sealed = assert_secrets_sealed(&pool, &id, &details).await;

    // A switchover is asked of Patroni's REST API; nothing answers on moto's VMs, so the task says so.
    let switchover = operate(
        &pool,
        &services,
        Operation::Switchover,
        &id,
        None,
        json!({}),
    )
    .await;
    assert_eq!(switchover.state, "failed");
    let error = switchover.last_error.unwrap_or_default();
    assert!(
        error.contains("cannot reach the cluster's Patroni REST API") && error.contains(":8008"),
        "{error}"
    );

    // A retried provision whose first try crashed before recording anything but its secrets adopts what
    // exists: no second VM, interface or address for any slot.
    instances::set_details(&pool, &id, &json!({}), Some(&sealed))
        .await
        .unwrap();
    operate_ok(&pool, &services, Operation::Provision, &id, None).await;
    let after = members(&client, &id).await;
    assert_eq!(after.len(), 3, "a retried provision makes no VM twice");
    for (name, vm) in &after {
        assert_eq!(
            vm.instance_id(),
            vms[name].instance_id(),
            "{name} kept its VM"
        );
    }
    assert_eq!(tagged_count(&client, &id).await, (3, 3, 1, 3));

    deprovision_leaves_nothing(&pool, &services, &client, &id).await;
}

/// A founding member's VM: on its slot's interface, in its zone, tagged; its user-data names itself and every
/// peer (etcd's initial cluster, formed, not joined); a scratch disk going with the VM; its Elastic IP.
async fn assert_member_vm(
    client: &Client,
    vm: &Instance,
    name: &str,
    member: &Value,
    id: &str,
    peers: &[(String, String)],
) {
    let initial = peers
        .iter()
        .map(|(name, ip)| format!("{name}=http://{ip}:2380"))
        .collect::<Vec<_>>()
        .join(",");
    // The VM sits on the slot's interface, in the slot's zone, tagged.
    assert_eq!(vm.instance_id(), member["vm_id"].as_str());
    assert_eq!(zone(vm), member["zone"].as_str().unwrap());
    assert_eq!(vm.private_ip_address(), member["private_ip"].as_str());
    assert_eq!(
        vm.network_interfaces()[0].network_interface_id(),
        member["interface_id"].as_str()
    );
    assert_eq!(tag(vm.tags(), "berth:instance"), Some(id));
    assert_eq!(tag(vm.tags(), "berth:members"), Some("m1,m2,m3"));
    assert_eq!(tag(vm.tags(), "team"), Some("data"));
    assert_eq!(
        vm.instance_type().unwrap().as_str(),
        member["instance_type"].as_str().unwrap()
    );
    // Its user-data: its own name and address, every peer in etcd's initial cluster, forming it.
    let text = user_data(client, vm).await;
    assert!(text.starts_with("#cloud-config\n"), "{text}");
    let ip = member["private_ip"].as_str().unwrap();
    for needle in [
        format!("      ETCD_NAME={name}\n"),
        format!("      ETCD_LISTEN_PEER_URLS=http://{ip}:2380\n"),
        format!("      ETCD_INITIAL_CLUSTER={initial}\n"),
        "      ETCD_INITIAL_CLUSTER_STATE=new\n".to_string(),
        format!("\"name\": \"{name}\""),
        format!("\"connect_address\": \"{ip}:5432\""),
        "\"ttl\": 7".to_string(),
    ] {
        assert!(text.contains(&needle), "{name}: missing {needle:?}");
    }
    for (other, _) in peers.iter().filter(|(n, _)| n != name) {
        assert!(
            !text.contains(&format!("ETCD_NAME={other}\n")),
            "{name} has {other}'s name"
        );
    }
    assert!(
        !text.contains("berth-etcd-membership join\n      cat"),
        "a founding member does not join"
    );
    // Its scratch disk: encrypted, sized, tagged, going with the VM.
    let volume = vm
        .block_device_mappings()
        .iter()
        .find(|b| b.device_name() == Some("/dev/sdf"))
        .expect("the scratch disk");
    assert_eq!(volume.ebs().unwrap().delete_on_termination(), Some(true));
    // With public_ip, an Elastic IP on the slot's interface.
    assert_eq!(vm.public_ip_address(), member["public_ip"].as_str());
}

/// The group: 5432 and 8008 from the allowed range; etcd, PostgreSQL and the REST API between members.
async fn assert_members_only_talk_to_each_other(client: &Client, id: &str) {
    let groups = security_groups(client, id).await;
    assert_eq!(groups.len(), 1);
    let group = &groups[0];
    let mut open: Vec<i32> = group
        .ip_permissions()
        .iter()
        .filter(|p| !p.ip_ranges().is_empty())
        .filter_map(|p| p.from_port())
        .collect();
    open.sort();
    assert_eq!(open, [5432, 8008]);
    let mut between: Vec<(i32, i32)> = group
        .ip_permissions()
        .iter()
        .filter(|p| {
            p.user_id_group_pairs()
                .iter()
                .any(|g| g.group_id() == group.group_id())
        })
        .map(|p| (p.from_port().unwrap(), p.to_port().unwrap()))
        .collect();
    between.sort();
    assert_eq!(between, [(2379, 2380), (5432, 5432), (8008, 8008)]);
}

/// The cluster's secrets are sealed in the instance's row, long, and never in its details; returns them sealed.
async fn assert_secrets_sealed(pool: &PgPool, id: &str, details: &Value) -> Vec<u8> {
    let sealed = instances::get(pool, id)
        .await
        .unwrap()
        .unwrap()
        .secrets
        .unwrap();
    let secrets: Value = cipher().open_json(&sealed).unwrap();
    let shown = details.to_string();
    for key in [
        "superuser",
        "replication",
        "rewind",
        "restapi",
        "admin_password",
    ] {
        let secret = secrets[key].as_str().unwrap();
        assert!(secret.len() >= 32 && !shown.contains(secret), "{key}");
    }
    assert!(!shown.contains("PRIVATE KEY"));
    sealed
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn five_spot_members_round_robin_over_the_asked_zones(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let (services, client) = ha_services().await;
    let (id, details) = provision(
        &pool,
        &services,
        json!({ "members": 5, "spot": true, "zones": ["us-east-1b", "us-east-1c"], "cpu_min": 2, "cpu_max": 2 }),
    )
    .await;
    let vms = members(&client, &id).await;
    assert_eq!(vms.len(), 5);
    let placed: Vec<(String, String)> = vms
        .iter()
        .map(|(name, vm)| (name.clone(), zone(vm)))
        .collect();
    assert_eq!(
        placed,
        [
            ("m1".to_string(), "us-east-1b".to_string()),
            ("m2".into(), "us-east-1c".into()),
            ("m3".into(), "us-east-1b".into()),
            ("m4".into(), "us-east-1c".into()),
            ("m5".into(), "us-east-1b".into()),
        ]
    );
    assert!(
        vms.values()
            .all(|vm| vm.instance_lifecycle().map(|l| l.as_str()) == Some("spot"))
    );
    let text = user_data(&client, &vms["m4"]).await;
    let initial = text
        .lines()
        .find(|l| l.trim_start().starts_with("ETCD_INITIAL_CLUSTER="))
        .unwrap();
    assert_eq!(initial.matches(":2380").count(), 5, "{initial}");
    assert_eq!(
        details["ha_ec2"]["zones"],
        json!(["us-east-1b", "us-east-1c"])
    );
    // Orphan-safe: with nothing recorded (a provision that crashed before its first record), the deprovision
    // still finds everything by its tags.
    instances::set_details(&pool, &id, &json!({}), None)
        .await
        .unwrap();
    deprovision_leaves_nothing(&pool, &services, &client, &id).await;
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_terminated_member_is_replaced_in_its_slot_and_joins_its_peers(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let (services, client) = ha_services().await;
    let (id, before) = provision(&pool, &services, json!({ "cpu_min": 2, "cpu_max": 2 })).await;
    let old = state_member(&before, "m2").clone();
    let old_vm = old["vm_id"].as_str().unwrap().to_string();
    let others: Vec<String> = ["m1", "m3"]
        .iter()
        .map(|m| {
            state_member(&before, m)["vm_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();

    // The member's VM goes away (a spot interruption looks the same to berth).
    client
        .terminate_instances()
        .instance_ids(&old_vm)
        .send()
        .await
        .unwrap();
    let after = eventually(Duration::from_secs(60), "m2 on a new running VM", || {
        let (pool, services, id, old_vm) =
            (pool.clone(), services.clone(), id.clone(), old_vm.clone());
        async move {
            berth_worker::reconcile::once(&pool, &services).await;
            let details = details(&pool, &id).await;
            let m2 = state_member(&details, "m2");
            (m2["replacing"] == false && m2["vm_id"].as_str().is_some_and(|v| v != old_vm))
                .then_some(details)
        }
    })
    .await;
    let vms = members(&client, &id).await;
    assert_eq!(vms.len(), 3, "the cluster is back to 3");
    let new = &vms["m2"];
    let m2 = state_member(&after, "m2");
    assert_eq!(new.instance_id(), m2["vm_id"].as_str());
    assert_eq!(
        zone(new),
        old["zone"].as_str().unwrap(),
        "the same slot: its zone"
    );
    assert_eq!(
        new.private_ip_address(),
        old["private_ip"].as_str(),
        "its address"
    );
    assert_eq!(
        new.network_interfaces()[0].network_interface_id(),
        old["interface_id"].as_str(),
        "its interface"
    );
    assert_eq!(m2["generation"], 1);
    for (name, vm_id) in ["m1", "m3"].iter().zip(&others) {
        assert_eq!(
            vms[*name].instance_id(),
            Some(vm_id.as_str()),
            "{name} untouched"
        );
    }
    // The new VM joins the running cluster: etcd through its surviving peers, then as an existing member.
    let text = user_data(&client, new).await;
    assert!(
        text.contains("      ETCD_INITIAL_CLUSTER_STATE=existing\n"),
        "{text}"
    );
    assert!(text.contains("      /usr/local/sbin/berth-etcd-membership join\n"));
    let peers = format!(
        "PEER_ENDPOINTS=http://{}:2379,http://{}:2379",
        state_member(&after, "m1")["private_ip"].as_str().unwrap(),
        state_member(&after, "m3")["private_ip"].as_str().unwrap()
    );
    assert!(text.contains(&peers), "{peers}");
    assert_eq!(after["recoveries"], 1);
    assert_eq!(after["last_recovered"], json!(["m2"]));

    // A pass with nothing lost changes nothing.
    berth_worker::reconcile::once(&pool, &services).await;
    assert_eq!(members(&client, &id).await.len(), 3);
    deprovision_leaves_nothing(&pool, &services, &client, &id).await;
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn members_scale_three_to_five_to_three_one_at_a_time(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let (services, client) = ha_services().await;
    let base = json!({ "cpu_min": 2, "cpu_max": 2 });
    let (id, _) = provision(&pool, &services, base.clone()).await;
    let first: BTreeMap<String, String> = members(&client, &id)
        .await
        .into_iter()
        .map(|(name, vm)| (name, vm.instance_id().unwrap().to_string()))
        .collect();

    let mut five = base.clone();
    five["members"] = json!(5);
    update_members(&pool, &services, &id, five).await;
    let vms = members(&client, &id).await;
    assert_eq!(
        vms.keys().collect::<Vec<_>>(),
        ["m1", "m2", "m3", "m4", "m5"]
    );
    for (name, vm_id) in &first {
        assert_eq!(
            vms[name].instance_id(),
            Some(vm_id.as_str()),
            "{name} kept its VM"
        );
    }
    for name in ["m4", "m5"] {
        let text = user_data(&client, &vms[name]).await;
        assert!(
            text.contains("      ETCD_INITIAL_CLUSTER_STATE=existing\n"),
            "{name} joins"
        );
    }
    for (name, vm) in &vms {
        assert_eq!(
            tag(vm.tags(), "berth:members"),
            Some("m1,m2,m3,m4,m5"),
            "{name}"
        );
    }
    let mut zones: Vec<String> = vms.values().map(zone).collect();
    zones.sort();
    zones.dedup();
    assert_eq!(zones.len(), 5, "the new members go to zones that had none");
    let details = details(&pool, &id).await;
    assert_eq!(details["members"].as_array().unwrap().len(), 5);

    update_members(&pool, &services, &id, base.clone()).await;
    let vms = members(&client, &id).await;
    assert_eq!(
        vms.keys().collect::<Vec<_>>(),
        ["m1", "m2", "m3"],
        "the newest members went"
    );
    for (name, vm) in &vms {
        assert_eq!(tag(vm.tags(), "berth:members"), Some("m1,m2,m3"), "{name}");
        assert_eq!(vm.instance_id(), Some(first[name].as_str()));
    }
    let details = crate::helpers::details(&pool, &id).await;
    assert_eq!(details["members"].as_array().unwrap().len(), 3);
    assert_eq!(details["ha_ec2"]["members"].as_array().unwrap().len(), 3);
    assert_eq!(
        tagged_count(&client, &id).await.0,
        3,
        "the removed members' interfaces are gone"
    );
    deprovision_leaves_nothing(&pool, &services, &client, &id).await;
}

/// One local etcd process of the membership test, killed when dropped.
struct Etcd {
    name: String,
    peer: String,
    client: String,
    child: std::process::Child,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcd_env_file(
    dir: &std::path::Path,
    name: &str,
    peer: &str,
    client: &str,
    cluster: &str,
    token: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.env"));
    let data = dir.join(format!("{name}-data"));
    std::fs::write(
        &path,
        format!(
            "ETCD_NAME={name}\nETCD_DATA_DIR={}\nETCD_LISTEN_PEER_URLS={peer}\nETCD_INITIAL_ADVERTISE_PEER_URLS={peer}\n\
             ETCD_LISTEN_CLIENT_URLS={client}\nETCD_ADVERTISE_CLIENT_URLS={client}\nETCD_INITIAL_CLUSTER_TOKEN={token}\n\
             ETCD_INITIAL_CLUSTER={cluster}\nETCD_INITIAL_CLUSTER_STATE=new\n",
            data.display()
        ),
    )
    .unwrap();
    path
}

/// Starts etcd with the settings of an environment file, as the member's systemd unit does.
fn start_etcd(env_file: &std::path::Path, log: &std::path::Path) -> Etcd {
    let text = std::fs::read_to_string(env_file).unwrap();
    let vars: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let get = |k: &str| vars.iter().find(|(key, _)| key == k).unwrap().1.clone();
    let child = std::process::Command::new("etcd")
        .env_clear()
        .envs(vars.iter().cloned())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .expect("etcd runs (scripts/lib/ha.sh installs etcd-server and etcd-client)");
    Etcd {
        name: get("ETCD_NAME"),
        peer: get("ETCD_LISTEN_PEER_URLS"),
        client: get("ETCD_ADVERTISE_CLIENT_URLS"),
        child,
    }
}

fn etcdctl(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--command-timeout=3s"])
        .args(args)
        .output()
        .expect("etcdctl runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// (name, status) of every member, as the members at `endpoint` see them.
fn member_list(endpoint: &str) -> Vec<(String, String)> {
    etcdctl(&["--endpoints", endpoint, "member", "list", "-w", "simple"])
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            (f[2].to_string(), f[1].to_string())
        })
        .collect()
}

async fn healthy(endpoint: &str) {
    let endpoint = endpoint.to_string();
    eventually(Duration::from_secs(30), "etcd to answer", || {
        let ok = etcdctl(&["--endpoints", &endpoint, "endpoint", "health"]).is_some();
        async move { ok.then_some(()) }
    })
    .await;
}

fn membership(conf: &std::path::Path, mode: &str, extra: &[(&str, &str)]) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/providers/ha_ec2/etcd-membership.sh"
    );
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(mode)
        .env("BERTH_MEMBERSHIP_CONF", conf)
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "etcd-membership.sh {mode}: {text}");
    text
}

/// The membership script of the user-data against real etcd processes: a member whose VM died is replaced by a
/// new one in its slot (same name and peer address, empty data) that joins through the survivors, and a
/// member the broker retired is pruned once it no longer answers, never while it does.
#[tokio::test]
async fn the_membership_script_rejoins_a_replaced_member_and_prunes_a_retired_one() {
    let dir = std::env::temp_dir().join(format!("berth-etcd-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = || broker::embedded::free_port().unwrap();
    let names = ["m1", "m2", "m3"];
    let urls: Vec<(String, String)> = names
        .iter()
        .map(|_| {
            (
                format!("http://127.0.0.1:{}", port()),
                format!("http://127.0.0.1:{}", port()),
            )
        })
        .collect();
    let cluster = names
        .iter()
        .zip(&urls)
        .map(|(n, (peer, _))| format!("{n}={peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let token = format!("t{}", uuid::Uuid::new_v4().simple());
    let mut members: Vec<Etcd> = names
        .iter()
        .zip(&urls)
        .map(|(n, (peer, client))| {
            let env = etcd_env_file(&dir, n, peer, client, &cluster, &token);
            start_etcd(&env, &dir.join(format!("{n}.log")))
        })
        .collect();
    for m in &members {
        healthy(&m.client).await;
    }
    let (c1, c3) = (members[0].client.clone(), members[2].client.clone());
    assert_eq!(member_list(&c1).len(), 3);

    // m2's VM dies; its replacement comes up in the same slot with empty data and joins.
    let dead = members.remove(1);
    let (peer2, client2) = (dead.peer.clone(), dead.client.clone());
    drop(dead);
    let replacement = dir.join("replacement");
    std::fs::create_dir_all(&replacement).unwrap();
    let env = etcd_env_file(&replacement, "m2", &peer2, &client2, &cluster, &token);
    let conf = replacement.join("membership.env");
    std::fs::write(
        &conf,
        format!(
            "ETCD_NAME=m2\nPEER_URL={peer2}\nPEER_ENDPOINTS={c1},{c3}\nETCD_ENV={}\nETCD_DATA_DIR={}\n",
            env.display(),
            replacement.join("m2-data").display()
        ),
    )
    .unwrap();
    let said = membership(&conf, "join", &[]);
    assert!(
        said.contains("removing member") && said.contains("joined as m2"),
        "{said}"
    );
    let written = std::fs::read_to_string(&env).unwrap();
    assert!(
        written
            .lines()
            .any(|l| l == "ETCD_INITIAL_CLUSTER_STATE=existing"),
        "{written}"
    );
    assert!(
        !written
            .lines()
            .any(|l| l == "ETCD_INITIAL_CLUSTER_STATE=new"),
        "{written}"
    );
    members.insert(1, start_etcd(&env, &replacement.join("m2.log")));
    healthy(&client2).await;
    let list = eventually(Duration::from_secs(30), "three started members", || {
        let list = member_list(&c1);
        async move { (list.len() == 3 && list.iter().all(|(_, s)| s == "started")).then_some(list) }
    })
    .await;
    let mut seen: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    seen.sort();
    assert_eq!(seen, names, "the slot's name is back, once");
    // The rejoined member serves reads and writes of the whole cluster.
    etcdctl(&[
        "--endpoints",
        &c1,
        "put",
        "berth-test",
        "written-through-m1",
    ])
    .unwrap();
    let read = etcdctl(&[
        "--endpoints",
        &client2,
        "get",
        "berth-test",
        "--print-value-only",
    ])
    .unwrap();
    assert_eq!(read.trim(), "written-through-m1");

    // Scale-down: m3 leaves the wanted list. While it answers it stays; once gone it is pruned.
    let m1_conf = dir.join("m1-membership.env");
    std::fs::write(
        &m1_conf,
        format!("ETCD_NAME=m1\nPEER_URL={}\n", members[0].peer),
    )
    .unwrap();
    let prune = [("WANTED", "m1,m2"), ("LOCAL_ENDPOINT", c1.as_str())];
    membership(&m1_conf, "prune", &prune);
    assert_eq!(
        member_list(&c1).len(),
        3,
        "a retired member that still answers is left alone"
    );
    let m3 = members.pop().unwrap();
    assert_eq!(m3.name, "m3");
    drop(m3);
    let said = membership(&m1_conf, "prune", &prune);
    assert!(said.contains("removing retired member m3"), "{said}");
    let list = member_list(&c1);
    assert_eq!(
        list.iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .len(),
        2,
        "{list:?}"
    );
    assert!(list.iter().all(|(n, _)| n != "m3"));
    // Members in the wanted list are never pruned, even when down.
    let m2 = members.pop().unwrap();
    drop(m2);
    membership(&m1_conf, "prune", &prune);
    assert_eq!(
        member_list(&c1).len(),
        2,
        "m2 is wanted: kept while it is down"
    );
    drop(members);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Warm-pool clusters of the `ha` plan (docs/pools.md): the fill records its progress on the item's row, tags
/// everything with the item's id and gives the cluster a re-key key; a cluster that loses a member's VM while it
/// waits is removed by the reconcile pass, leaving nothing; a take whose member VM went before that pass saw it
/// tears the item down and provisions the instance the ordinary way, with secrets of its own.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn pooled_clusters_that_lost_a_member_are_removed_or_replaced_by_the_ordinary_path(
    _: sqlx::postgres::PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let peer = moto();
    let client = ec2(&peer);
    let services =
        services_with(&peer, json!({ "ha_engine": "ec2", "pool_targets": "ha=2" })).await;
    let checked = berth_worker::pools::check(&pool, &services).await.unwrap();
    assert_eq!(checked.fills, 2);
    drain_all(&pool, &services).await;
    let items: Vec<pools::PoolItem> = pools::list(&pool).await.unwrap();
    assert!(
        items.len() == 2 && items.iter().all(|i| i.state == pools::READY),
        "{items:?}"
    );
    let vms_of = |item: &pools::PoolItem| -> Vec<String> {
        item.details["ha_ec2"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["vm_id"].as_str().unwrap().to_string())
            .collect()
    };
    for item in &items {
        let live = members(&client, &item.id).await;
        assert_eq!(live.len(), 3, "{}", item.id);
        let mut ids: Vec<String> = live
            .values()
            .map(|vm| vm.instance_id().unwrap().to_string())
            .collect();
        ids.sort();
        let mut recorded = vms_of(item);
        recorded.sort();
        assert_eq!(ids, recorded, "the item's row holds the fill's VMs");
        let secrets: Value = cipher().open_json(item.secrets.as_ref().unwrap()).unwrap();
        assert_eq!(secrets["rekey_key"].as_str().map(str::len), Some(64));
    }

    // A member lost while pooled: the reconcile pass marks the item for removal, its pool.remove leaves nothing.
    let (interrupted, taken) = (&items[0], &items[1]);
    terminate(&client, &vms_of(interrupted)[1]).await;
    reconcile_removes(&pool, &services, &interrupted.id, &taken.id).await;
    drain_all(&pool, &services).await;
    assert!(pools::get(&pool, &interrupted.id).await.unwrap().is_none());
    assert!(live_vms(&client, &interrupted.id).await.is_empty());
    assert_eq!(tagged_count(&client, &interrupted.id).await, (0, 0, 0, 0));

    // Taken (as the API's claim takes it) after a member's VM went: the item is torn down, the instance
    // provisioned the ordinary way.
    terminate(&client, &vms_of(taken)[0]).await;
    let (claimed, id) = take_from_pool(&pool, HA, json!({"admin_user": "boss"})).await;
    assert_eq!(claimed.id, taken.id);
    operate_ok(&pool, &services, Operation::Provision, &id, None).await;
    let details = details(&pool, &id).await;
    assert_eq!(details["pool_fell_back"], true, "{details}");
    assert_eq!(details["admin_user"], "boss");
    let live = members(&client, &id).await;
    assert_eq!(live.len(), 3, "{details}");
    let pooled_vms = vms_of(taken);
    assert!(
        live.values().all(|vm| !pooled_vms
            .iter()
            .any(|p| Some(p.as_str()) == vm.instance_id())),
        "new VMs"
    );
    assert!(live_vms(&client, &taken.id).await.is_empty());
    assert_eq!(tagged_count(&client, &taken.id).await, (0, 0, 0, 0));
    let pooled: Value = cipher().open_json(taken.secrets.as_ref().unwrap()).unwrap();
    let row = instances::get(&pool, &id).await.unwrap().unwrap();
    let fresh: Value = cipher().open_json(row.secrets.as_ref().unwrap()).unwrap();
    for key in [
        "superuser",
        "replication",
        "rewind",
        "restapi",
        "admin_password",
        "rekey_key",
    ] {
        assert_ne!(fresh[key], pooled[key], "{key} made while pooled survived");
    }
    deprovision_leaves_nothing(&pool, &services, &client, &id).await;
}
