//! What the cluster's processes are started with: etcd's command line and each member's Patroni
//! configuration (written as JSON, which Patroni's YAML reader accepts).

use std::{ffi::OsString, path::Path};

use serde_json::{Value, json};

use super::state::{ClusterState, Layout, Member, Secrets};
use crate::providers::patroni::{
    REPLICATION_USER, RESTAPI_USER, REWIND_USER, SUPERUSER, dcs::NAMESPACE,
};

pub const HOST: &str = "127.0.0.1";

/// etcd's arguments: one member, listening on 127.0.0.1 only, compacting its history so the keys Patroni
/// rewrites every loop do not grow it without bound.
pub fn etcd_args(state: &ClusterState, layout: &Layout) -> Vec<OsString> {
    let client = format!("http://{HOST}:{}", state.etcd_client_port);
    let peer = format!("http://{HOST}:{}", state.etcd_peer_port);
    let mut args: Vec<OsString> = Vec::new();
    let mut arg = |k: &str, v: &str| {
        args.push(k.into());
        args.push(v.into());
    };
    arg("--name", "berth");
    arg("--listen-client-urls", &client);
    arg("--advertise-client-urls", &client);
    arg("--listen-peer-urls", &peer);
    arg("--initial-advertise-peer-urls", &peer);
    arg("--initial-cluster", &format!("berth={peer}"));
    arg("--initial-cluster-state", "new");
    arg("--initial-cluster-token", &state.scope);
    arg("--auto-compaction-mode", "revision");
    arg("--auto-compaction-retention", "1000");
    args.push("--enable-v2=false".into());
    args.push("--data-dir".into());
    args.push(layout.etcd_dir().into_os_string());
    args
}

/// pg_hba: TLS and scram only, from this machine only: replication for the replication user, everything
/// else (apps, the superuser, pg_rewind) to any database. No `trust`, no plain-text connections.
pub fn pg_hba() -> Vec<String> {
    vec![
        format!("hostssl replication {REPLICATION_USER} {HOST}/32 scram-sha-256"),
        format!("hostssl all all {HOST}/32 scram-sha-256"),
    ]
}

/// One member's Patroni configuration.
pub fn patroni_config(
    state: &ClusterState,
    layout: &Layout,
    member: &Member,
    secrets: &Secrets,
    dcs: Value,
) -> Value {
    let ca = layout.ca_cert();
    let tls = layout.tls_dir();
    let path = |p: &Path| p.display().to_string();
    let login = |user: &str, password: &str| json!({ "username": user, "password": password, "sslmode": "verify-ca", "sslrootcert": path(&ca) });
    json!({
        "scope": state.scope,
        "namespace": NAMESPACE,
        "name": member.name,
        "log": { "level": "INFO" },
        "restapi": {
            "listen": format!("{HOST}:{}", member.api_port),
            "connect_address": format!("{HOST}:{}", member.api_port),
            "authentication": { "username": RESTAPI_USER, "password": secrets.restapi },
        },
        "etcd3": { "hosts": [format!("{HOST}:{}", state.etcd_client_port)] },
        "bootstrap": {
            "dcs": dcs,
            "initdb": [{ "encoding": "UTF8" }, { "locale": "C" }, "data-checksums"],
        },
        "postgresql": {
            "listen": format!("{HOST}:{}", member.pg_port),
            "connect_address": format!("{HOST}:{}", member.pg_port),
            "data_dir": path(&layout.member_data(&member.name)),
            "bin_dir": path(&state.bin_dir),
            "pgpass": path(&layout.member_dir(&member.name).join("pgpass")),
            "authentication": {
                "superuser": login(SUPERUSER, &secrets.superuser),
                "replication": login(REPLICATION_USER, &secrets.replication),
                "rewind": login(REWIND_USER, &secrets.rewind),
            },
            // Per member: its files. TCP only (no Unix socket), over TLS.
            "parameters": {
                "unix_socket_directories": "",
                "ssl": "on",
                "ssl_cert_file": path(&tls.join("server.crt")),
                "ssl_key_file": path(&tls.join("server.key")),
                "ssl_ca_file": path(&ca),
            },
            "pg_hba": pg_hba(),
        },
        "tags": { "nofailover": false, "noloadbalance": false, "clonefrom": false, "nosync": false },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::patroni::{dcs::dcs_config, timings::FAST};

    fn cluster() -> (ClusterState, Layout) {
        let state = ClusterState {
            scope: "berth_ha_x".into(),
            postgres_version: "15".into(),
            bin_dir: "/usr/lib/postgresql/15/bin".into(),
            etcd_client_port: 2379,
            etcd_peer_port: 2380,
            members: vec![Member {
                name: "m1".into(),
                pg_port: 5432,
                api_port: 8008,
            }],
            next_member: 2,
        };
        (state, Layout::new("/srv/berth_ha_x".into()))
    }

    #[test]
    fn member_config_is_tls_scram_and_fast() {
        let (state, layout) = cluster();
        let secrets = Secrets::generate();
        let config = patroni_config(
            &state,
            &layout,
            &state.members[0],
            &secrets,
            dcs_config(FAST, true, "oltp"),
        );
        let dcs = &config["bootstrap"]["dcs"];
        assert_eq!(
            (
                dcs["ttl"].as_u64(),
                dcs["loop_wait"].as_u64(),
                dcs["retry_timeout"].as_u64()
            ),
            (Some(7), Some(1), Some(3))
        );
        assert_eq!(dcs["synchronous_mode"], true);
        assert_eq!(dcs["postgresql"]["parameters"]["wal_level"], "replica");
        assert_eq!(
            dcs["postgresql"]["parameters"]["max_connections"], "200",
            "the oltp profile applies"
        );
        let hba: Vec<String> =
            serde_json::from_value(config["postgresql"]["pg_hba"].clone()).unwrap();
        assert!(
            hba.iter().all(|l| l.starts_with("hostssl ")
                && l.ends_with(" scram-sha-256")
                && l.contains(" 127.0.0.1/32 ")),
            "{hba:?}"
        );
        assert!(
            !hba.iter()
                .any(|l| l.contains("0.0.0.0") || l.contains("md5") || l.contains("trust"))
        );
        assert_eq!(
            config["postgresql"]["authentication"]["replication"]["sslmode"],
            "verify-ca"
        );
        assert_eq!(config["postgresql"]["parameters"]["ssl"], "on");
        assert_eq!(config["restapi"]["listen"], "127.0.0.1:8008");
        let args: Vec<String> = etcd_args(&state, &layout)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--listen-client-urls", "http://127.0.0.1:2379"]),
            "{args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--data-dir", "/srv/berth_ha_x/etcd"]),
            "{args:?}"
        );
    }
}
