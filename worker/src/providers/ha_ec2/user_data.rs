//! One member's cloud-init user-data, rendered from `cloud-init.yaml.j2` (compiled in): the cluster's CA and the
//! member's certificate, etcd's environment (the member list as this member starts it), Patroni's configuration
//! (berth's checked timings, TLS, scram, pg_hba for the cluster's network only), the app database's setup run
//! once by Patroni after the cluster is made, and `etcd-membership.sh`, which a joining member runs before etcd.
//!
//! Every value that reaches a script or SQL is an identifier the schema restricts to `[a-z0-9_]`, a generated
//! alphanumeric password, an address or CIDR that parsed as one, or PEM text written verbatim into a file.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::providers::patroni::{
    REPLICATION_USER, RESTAPI_USER, REWIND_USER, SUPERUSER,
    dcs::{NAMESPACE, dcs_config},
    timings::Timings,
    tls::Pem,
};

use super::state::Secrets;
use crate::providers::postgres::scram;

const TEMPLATE: &str = include_str!("cloud-init.yaml.j2");
const MEMBERSHIP_SCRIPT: &str = include_str!("etcd-membership.sh");

pub const PG_PORT: u16 = 5432;
pub const API_PORT: u16 = 8008;
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
const DATA_DIR: &str = "/var/lib/berth/pgdata";
const TLS_DIR: &str = "/etc/berth/tls";

/// What one member's user-data is made of.
#[derive(Debug)]
pub struct MemberSetup<'a> {
    pub instance_id: &'a str,
    /// Patroni's scope and etcd's cluster token.
    pub scope: &'a str,
    pub member: &'a str,
    pub private_ip: &'a str,
    /// Every member (name, private IP), this one included: etcd's initial cluster.
    pub peers: &'a [(String, String)],
    /// Joins a running cluster (a replacement or a scale-up) instead of forming it.
    pub joins: bool,
    pub postgres_version: &'a str,
    pub timings: Timings,
    pub synchronous: bool,
    pub tuning_profile: &'a str,
    /// The VPC's range: the cluster's network. Members replicate and rewind from there only.
    pub cluster_cidr: &'a str,
    /// Clients outside it (apps, berth's workers) that pg_hba admits too: see [`clients_range`].
    pub clients_cidr: Option<&'a str>,
    pub app_db_name: &'a str,
    pub admin_user: &'a str,
    pub owner_role: &'a str,
    pub extensions: &'a [String],
    pub ssh_keys: &'a [String],
    pub secrets: &'a Secrets,
    /// This member's certificate (signed by the cluster's CA for its addresses) and key.
    pub tls: &'a Pem,
}

/// Rendered user-data (it holds passwords and a private key: never logged).
pub struct Rendered(pub String);

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rendered(<user-data with passwords>)")
    }
}

fn safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

fn cidr_ok(s: &str) -> bool {
    s.split_once('/').is_some_and(|(ip, bits)| {
        ip.parse::<IpAddr>().is_ok() && bits.parse::<u8>().is_ok_and(|b| b <= 128)
    })
}

fn peer_url(ip: &str) -> String {
    format!("http://{ip}:{ETCD_PEER_PORT}")
}

fn client_url(ip: &str) -> String {
    format!("http://{ip}:{ETCD_CLIENT_PORT}")
}

/// The range of clients outside the cluster's network that pg_hba admits: `EC2_ALLOWED_CIDR` (what the security
/// group admits) when the operator narrowed it, or when the cluster has public addresses; else none. A cluster on
/// private addresses behind the default "anywhere" is reachable from its network only, so pg_hba says so.
pub fn clients_range(allowed_cidr: &str, public: bool) -> Option<&str> {
    let anywhere = matches!(allowed_cidr, "0.0.0.0/0" | "::/0");
    (public || !anywhere).then_some(allowed_cidr)
}

/// pg_hba: local superuser by peer (Patroni and its bootstrap script), then TLS with scram only: replication and
/// everything else from the cluster's network, and clients from `clients_cidr` when there is one. No `trust`,
/// no `md5`, no plain TCP.
pub fn pg_hba(cluster_cidr: &str, clients_cidr: Option<&str>) -> Vec<String> {
    let mut lines = vec![
        format!("local all {SUPERUSER} peer"),
        format!("hostssl replication {REPLICATION_USER} {cluster_cidr} scram-sha-256"),
        // Patroni 4 reads a stopped old primary's timeline over a local replication connection before it rewinds
        // it; without this line a primary cut off by a partition never rejoins.
        format!("hostssl replication {REPLICATION_USER} 127.0.0.1/32 scram-sha-256"),
        "hostssl all all 127.0.0.1/32 scram-sha-256".to_string(),
        format!("hostssl all all {cluster_cidr} scram-sha-256"),
    ];
    if let Some(clients) = clients_cidr.filter(|c| *c != cluster_cidr) {
        lines.push(format!("hostssl all all {clients} scram-sha-256"));
    }
    lines
}

/// etcd's environment file for this member.
fn etcd_env(data: &MemberSetup<'_>) -> String {
    let me = data.private_ip;
    let cluster: Vec<String> = data
        .peers
        .iter()
        .map(|(name, ip)| format!("{name}={}", peer_url(ip)))
        .collect();
    [
        format!("ETCD_NAME={}", data.member),
        "ETCD_DATA_DIR=/var/lib/berth/etcd".into(),
        format!("ETCD_LISTEN_PEER_URLS={}", peer_url(me)),
        format!(
            "ETCD_LISTEN_CLIENT_URLS={},{}",
            client_url(me),
            client_url("127.0.0.1")
        ),
        format!("ETCD_ADVERTISE_CLIENT_URLS={}", client_url(me)),
        format!("ETCD_INITIAL_ADVERTISE_PEER_URLS={}", peer_url(me)),
        format!("ETCD_INITIAL_CLUSTER_TOKEN={}", data.scope),
        // Compacted, so the keys Patroni rewrites every loop do not grow it without bound.
        "ETCD_AUTO_COMPACTION_MODE=revision".into(),
        "ETCD_AUTO_COMPACTION_RETENTION=1000".into(),
        "ETCD_ENABLE_V2=false".into(),
        // A member cut off from the others keeps starting elections at ever higher terms; without pre-vote its
        // return makes the healthy leader step down, and Patroni can lose its leader key (seen on emulated VMs
        // when a partition healed). etcd 3.4 (Debian 12's) has it off by default.
        "ETCD_PRE_VOTE=true".into(),
        format!("ETCD_INITIAL_CLUSTER={}", cluster.join(",")),
        format!(
            "ETCD_INITIAL_CLUSTER_STATE={}",
            if data.joins { "existing" } else { "new" }
        ),
    ]
    .join("\n")
}

/// What `etcd-membership.sh` reads.
fn membership_env(data: &MemberSetup<'_>) -> String {
    let others: Vec<String> = data
        .peers
        .iter()
        .filter(|(name, _)| name != data.member)
        .map(|(_, ip)| client_url(ip))
        .collect();
    [
        format!("ETCD_NAME={}", data.member),
        format!("PEER_URL={}", peer_url(data.private_ip)),
        format!("PEER_ENDPOINTS={}", others.join(",")),
        "ETCD_ENV=/etc/berth/etcd.env".into(),
        "ETCD_DATA_DIR=/var/lib/berth/etcd".into(),
    ]
    .join("\n")
}

/// This member's Patroni configuration (JSON, which Patroni's YAML reader takes).
pub fn patroni_config(data: &MemberSetup<'_>) -> Value {
    let ca = format!("{TLS_DIR}/ca.crt");
    let login = |user: &str, password: &str| json!({ "username": user, "password": password, "sslmode": "verify-ca", "sslrootcert": ca });
    // Its own etcd first; the peers' when it is down.
    let mut etcd_hosts = vec![format!("127.0.0.1:{ETCD_CLIENT_PORT}")];
    etcd_hosts.extend(
        data.peers
            .iter()
            .filter(|(name, _)| name != data.member)
            .map(|(_, ip)| format!("{ip}:{ETCD_CLIENT_PORT}")),
    );
    let secrets = data.secrets;
    json!({
        "scope": data.scope,
        "namespace": NAMESPACE,
        "name": data.member,
        "log": { "level": "INFO" },
        "restapi": {
            "listen": format!("0.0.0.0:{API_PORT}"),
            "connect_address": format!("{}:{API_PORT}", data.private_ip),
            "certfile": format!("{TLS_DIR}/server.crt"),
            "keyfile": format!("{TLS_DIR}/server.key"),
            "authentication": { "username": RESTAPI_USER, "password": secrets.passwords.restapi },
        },
        "etcd3": { "hosts": etcd_hosts },
        "bootstrap": {
            "dcs": dcs_config(data.timings, data.synchronous, data.tuning_profile),
            "initdb": [{ "encoding": "UTF8" }, { "locale": "C" }, "data-checksums"],
            "post_bootstrap": "/usr/local/sbin/berth-post-bootstrap",
        },
        "postgresql": {
            "listen": format!("0.0.0.0:{PG_PORT}"),
            "connect_address": format!("{}:{PG_PORT}", data.private_ip),
            "use_unix_socket": true,
            "data_dir": DATA_DIR,
            "bin_dir": format!("/usr/lib/postgresql/{}/bin", data.postgres_version),
            "pgpass": "/var/lib/berth/pgpass",
            "authentication": {
                "superuser": login(SUPERUSER, &secrets.passwords.superuser),
                "replication": login(REPLICATION_USER, &secrets.passwords.replication),
                "rewind": login(REWIND_USER, &secrets.passwords.rewind),
            },
            "parameters": {
                "unix_socket_directories": "/var/run/postgresql",
                "ssl": "on",
                "ssl_cert_file": format!("{TLS_DIR}/server.crt"),
                "ssl_key_file": format!("{TLS_DIR}/server.key"),
                "ssl_ca_file": ca,
            },
            "pg_hba": pg_hba(data.cluster_cidr, data.clients_cidr),
        },
        "tags": { "nofailover": false, "noloadbalance": false, "clonefrom": false, "nosync": false },
    })
}

/// The app database, its owner and admin user, and the extensions: run once on the first primary.
/// The admin user's password goes as a SCRAM verifier, never as text a server log could keep.
fn setup_sql(data: &MemberSetup<'_>) -> anyhow::Result<String> {
    let (owner, admin, db) = (data.owner_role, data.admin_user, data.app_db_name);
    let admin_verifier = scram::verifier(&data.secrets.admin_password)?;
    let mut sql = vec![
        format!("CREATE ROLE {owner} NOLOGIN;"),
        format!("CREATE ROLE {admin} LOGIN CREATEDB PASSWORD '{admin_verifier}';"),
        format!("GRANT {owner} TO {admin};"),
        format!("CREATE DATABASE {db} OWNER {owner};"),
        format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC;"),
        format!("\\c {db}"),
        format!("ALTER SCHEMA public OWNER TO {owner};"),
    ];
    sql.extend(
        data.extensions
            .iter()
            .map(|e| format!("CREATE EXTENSION IF NOT EXISTS \"{e}\";")),
    );
    Ok(sql.join("\n"))
}

pub fn render(data: &MemberSetup<'_>) -> anyhow::Result<Rendered> {
    data.timings
        .check()
        .map_err(|e| anyhow::anyhow!("Patroni timings: {e}"))?;
    let secrets = data.secrets;
    for (what, value) in [
        ("scope", data.scope),
        ("member name", data.member),
        ("postgres_version", data.postgres_version),
        ("app_db_name", data.app_db_name),
        ("admin_user", data.admin_user),
        ("owner role", data.owner_role),
        ("tuning profile", data.tuning_profile),
        ("superuser password", secrets.passwords.superuser.as_str()),
        (
            "replication password",
            secrets.passwords.replication.as_str(),
        ),
        ("rewind password", secrets.passwords.rewind.as_str()),
        ("REST API password", secrets.passwords.restapi.as_str()),
        ("admin password", secrets.admin_password.as_str()),
        ("re-key key", secrets.rekey_key.as_deref().unwrap_or("none")),
    ] {
        anyhow::ensure!(
            safe(value),
            "{what} has characters the user-data cannot carry safely"
        );
    }
    anyhow::ensure!(
        data.extensions.iter().all(|e| safe(e)),
        "an extension name has characters the user-data cannot carry safely"
    );
    anyhow::ensure!(
        data.private_ip.parse::<IpAddr>().is_ok(),
        "the member's address is not an IP address"
    );
    anyhow::ensure!(
        data.peers
            .iter()
            .all(|(name, ip)| safe(name) && ip.parse::<IpAddr>().is_ok()),
        "a peer's name or address cannot be carried safely"
    );
    anyhow::ensure!(
        data.peers.iter().any(|(name, _)| name == data.member),
        "the member is not in its own peer list"
    );
    anyhow::ensure!(
        cidr_ok(data.cluster_cidr) && data.clients_cidr.is_none_or(cidr_ok),
        "the cluster's network or the clients' range is not a CIDR"
    );
    let mut env = minijinja::Environment::new();
    env.set_keep_trailing_newline(true);
    env.add_template("cloud-init", TEMPLATE)?;
    let patroni = serde_json::to_string_pretty(&patroni_config(data))?;
    let text = env
        .get_template("cloud-init")?
        .render(minijinja::context! {
            instance_id => data.instance_id,
            scope => data.scope,
            member => data.member,
            joins => data.joins,
            postgres_version => data.postgres_version,
            ssh_keys => data.ssh_keys,
            ca_cert => secrets.ca.cert.trim_end(),
            server_cert => data.tls.cert.trim_end(),
            server_key => data.tls.key.trim_end(),
            etcd_env => etcd_env(data),
            membership_env => membership_env(data),
            patroni_config => patroni,
            setup_sql => setup_sql(data)?,
            membership_script => MEMBERSHIP_SCRIPT.trim_end(),
            rekey_key => secrets.rekey_key.as_deref(),
            rekey_agent => super::rekey::AGENT.trim_end(),
        })?;
    Ok(Rendered(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::patroni::{Passwords, timings::FAST};

    fn secrets() -> Secrets {
        Secrets {
            passwords: Passwords {
                superuser: "SuperPassw0rdAAAA".into(),
                replication: "ReplPassw0rdBBBB".into(),
                rewind: "RewindPassw0rdCCCC".into(),
                restapi: "RestPassw0rdDDDD".into(),
            },
            admin_password: "AdminPassw0rdEEEE".into(),
            ca: Pem {
                cert: "-----BEGIN CERTIFICATE-----\nCACERT\n-----END CERTIFICATE-----\n".into(),
                key: "-----BEGIN PRIVATE KEY-----\nCAKEYSECRET\n-----END PRIVATE KEY-----\n".into(),
            },
            rekey_key: Some("ab12ReKeyKeyFFFF".into()),
            taking: None,
        }
    }

    fn peers() -> Vec<(String, String)> {
        vec![
            ("m1".into(), "10.0.1.11".into()),
            ("m2".into(), "10.0.2.12".into()),
            ("m3".into(), "10.0.3.13".into()),
        ]
    }

    fn setup<'a>(
        member: &'a str,
        ip: &'a str,
        joins: bool,
        peers: &'a [(String, String)],
        secrets: &'a Secrets,
        tls: &'a Pem,
    ) -> MemberSetup<'a> {
        MemberSetup {
            instance_id: "inst-1",
            scope: "bt_ha_0123",
            member,
            private_ip: ip,
            peers,
            joins,
            postgres_version: "17",
            timings: FAST,
            synchronous: true,
            tuning_profile: "oltp",
            cluster_cidr: "10.0.0.0/16",
            clients_cidr: Some("192.0.2.0/24"),
            app_db_name: "shop",
            admin_user: "shop_admin",
            owner_role: "bt_own_abc",
            extensions: &[],
            ssh_keys: &[],
            secrets,
            tls,
        }
    }

    fn member_pem(name: &str) -> Pem {
        Pem {
            cert: format!("-----BEGIN CERTIFICATE-----\nCERT-{name}\n-----END CERTIFICATE-----\n"),
            key: format!("-----BEGIN PRIVATE KEY-----\nKEY-{name}\n-----END PRIVATE KEY-----\n"),
        }
    }

    /// A write_files entry's content, unindented.
    fn file(text: &str, path: &str) -> String {
        let start = text
            .find(&format!("  - path: {path}\n"))
            .unwrap_or_else(|| panic!("no {path} in:\n{text}"));
        text[start..]
            .lines()
            .skip(3)
            .take_while(|l| l.is_empty() || l.starts_with("      "))
            .map(|l| l.strip_prefix("      ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn each_member_gets_its_own_name_address_and_certificate() {
        let (secrets, peers) = (secrets(), peers());
        let (pem1, pem2) = (member_pem("m1"), member_pem("m2"));
        let one = render(&setup("m1", "10.0.1.11", false, &peers, &secrets, &pem1))
            .unwrap()
            .0;
        let two = render(&setup("m2", "10.0.2.12", false, &peers, &secrets, &pem2))
            .unwrap()
            .0;
        assert!(one.starts_with("#cloud-config\n"), "{one}");
        let etcd = file(&one, "/etc/berth/etcd.env");
        for needle in [
            "ETCD_NAME=m1",
            "ETCD_LISTEN_PEER_URLS=http://10.0.1.11:2380",
            "ETCD_ADVERTISE_CLIENT_URLS=http://10.0.1.11:2379",
            "ETCD_INITIAL_CLUSTER=m1=http://10.0.1.11:2380,m2=http://10.0.2.12:2380,m3=http://10.0.3.13:2380",
            "ETCD_INITIAL_CLUSTER_STATE=new",
            "ETCD_INITIAL_CLUSTER_TOKEN=bt_ha_0123",
            "ETCD_PRE_VOTE=true",
        ] {
            assert!(
                etcd.lines().any(|l| l == needle),
                "missing {needle:?} in:\n{etcd}"
            );
        }
        assert!(
            file(&two, "/etc/berth/etcd.env")
                .lines()
                .any(|l| l == "ETCD_NAME=m2")
        );
        // The same initial cluster on every member; the rest is each member's own.
        let initial = |t: &str| {
            file(t, "/etc/berth/etcd.env")
                .lines()
                .find(|l| l.starts_with("ETCD_INITIAL_CLUSTER="))
                .unwrap()
                .to_string()
        };
        assert_eq!(initial(&one), initial(&two));
        let patroni: Value = serde_json::from_str(&file(&two, "/etc/berth/patroni.yml")).unwrap();
        assert_eq!(patroni["name"], "m2");
        assert_eq!(patroni["postgresql"]["connect_address"], "10.0.2.12:5432");
        assert_eq!(patroni["restapi"]["connect_address"], "10.0.2.12:8008");
        assert_eq!(
            patroni["etcd3"]["hosts"],
            json!(["127.0.0.1:2379", "10.0.1.11:2379", "10.0.3.13:2379"])
        );
        assert!(one.contains("CERT-m1") && one.contains("KEY-m1") && !one.contains("CERT-m2"));
        assert!(two.contains("CERT-m2") && !two.contains("KEY-m1"));
        assert!(
            one.contains("CACERT") && !one.contains("CAKEYSECRET"),
            "the CA's key stays with berth"
        );
        let membership = file(&two, "/etc/berth/membership.env");
        assert!(
            membership.contains("PEER_ENDPOINTS=http://10.0.1.11:2379,http://10.0.3.13:2379"),
            "{membership}"
        );
        // A member that forms the cluster does not run the join.
        assert!(
            !one.contains("\nberth-etcd-membership join")
                && !one.contains("      /usr/local/sbin/berth-etcd-membership join")
        );
    }

    #[test]
    fn a_joining_member_joins_through_its_peers_before_etcd_starts() {
        let (secrets, peers, pem) = (secrets(), peers(), member_pem("m2"));
        let text = render(&setup("m2", "10.0.2.12", true, &peers, &secrets, &pem))
            .unwrap()
            .0;
        let etcd = file(&text, "/etc/berth/etcd.env");
        assert!(
            etcd.lines()
                .any(|l| l == "ETCD_INITIAL_CLUSTER_STATE=existing"),
            "{etcd}"
        );
        let setup_script = file(&text, "/usr/local/sbin/berth-setup");
        let join = setup_script
            .find("/usr/local/sbin/berth-etcd-membership join")
            .expect("the join runs");
        let start = setup_script
            .find("systemctl start --no-block berth-etcd")
            .unwrap();
        assert!(join < start, "the join comes before etcd starts");
        let script = file(&text, "/usr/local/sbin/berth-etcd-membership");
        assert!(script.contains("member remove") && script.contains("member add"));
        assert!(script.contains("ETCD_INITIAL_CLUSTER_STATE=existing"));
    }

    #[test]
    fn secrets_stay_in_the_files_that_need_them() {
        let (secrets, peers, pem) = (secrets(), peers(), member_pem("m1"));
        let data = setup("m1", "10.0.1.11", false, &peers, &secrets, &pem);
        let rendered = render(&data).unwrap();
        let text = &rendered.0;
        // Nothing berth may log shows a secret: the rendered text's Debug, the inputs' Debug.
        for shown in [
            format!("{rendered:?}"),
            format!("{secrets:?}"),
            format!("{pem:?}"),
        ] {
            for secret in [
                "SuperPassw0rd",
                "ReplPassw0rd",
                "RewindPassw0rd",
                "RestPassw0rd",
                "AdminPassw0rd",
                "CAKEYSECRET",
                "KEY-m1",
                "ReKeyKey",
            ] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
        // The setup SQL carries the admin user's SCRAM verifier, never the password.
        let setup = file(text, "/etc/berth/setup.sql");
        assert!(!setup.contains("AdminPassw0rdEEEE"), "{setup}");
        let create_admin = "CREATE ROLE shop_admin LOGIN CREATEDB PASSWORD 'SCRAM-SHA-256$4096:";
        assert!(setup.contains(create_admin), "{setup}");
        // The superuser's password only in the root-only file (Patroni's configuration).
        let at = text.find("SuperPassw0rdAAAA").unwrap();
        let owner = text[..at].rfind("  - path: ").unwrap();
        assert!(
            text[owner..]
                .starts_with("  - path: /etc/berth/patroni.yml\n    permissions: \"0600\"")
        );
        // The re-key key only in its root-only file; the agent that reads it runs as a service.
        let at = text.find("ab12ReKeyKeyFFFF").unwrap();
        let owner = text[..at].rfind("  - path: ").unwrap();
        assert!(
            text[owner..].starts_with("  - path: /etc/berth/rekey.key\n    permissions: \"0600\""),
            "{}",
            &text[owner..at]
        );
        assert_eq!(text.matches("ab12ReKeyKeyFFFF").count(), 1);
        assert!(file(text, "/usr/local/sbin/berth-rekey").contains("def derive("));
        let setup_script = file(text, "/usr/local/sbin/berth-setup");
        assert!(
            setup_script.contains("berth-rekey.service")
                && setup_script.contains("ExecStart=/usr/local/sbin/berth-rekey"),
            "{setup_script}"
        );
        for public in [
            "/etc/berth/etcd.env",
            "/etc/berth/membership.env",
            "/usr/local/sbin/berth-setup",
            "/usr/local/sbin/berth-rekey",
        ] {
            let content = file(text, public);
            assert!(
                !content.contains("Passw0rd") && !content.contains("ReKeyKey"),
                "{public}: {content}"
            );
        }
        // A cluster made before re-key keys existed gets no key file and no agent.
        let old = Secrets {
            rekey_key: None,
            ..secrets.clone()
        };
        let without = render(&self::setup("m1", "10.0.1.11", false, &peers, &old, &pem))
            .unwrap()
            .0;
        assert!(
            !without.contains("/etc/berth/rekey.key") && !without.contains("berth-rekey.service")
        );
    }

    #[test]
    fn pg_hba_is_tls_scram_and_the_cluster_network_only() {
        let hba = pg_hba("10.0.0.0/16", Some("192.0.2.0/24"));
        assert_eq!(hba[0], "local all postgres peer");
        for line in &hba[1..] {
            assert!(
                line.starts_with("hostssl ") && line.ends_with(" scram-sha-256"),
                "{line}"
            );
        }
        assert!(
            hba.contains(&"hostssl replication replicator 10.0.0.0/16 scram-sha-256".to_string())
        );
        assert!(
            hba.contains(&"hostssl replication replicator 127.0.0.1/32 scram-sha-256".to_string()),
            "Patroni 4 reads a stopped primary's timeline over a local replication connection"
        );
        assert!(
            hba.iter()
                .all(|l| !l.contains("0.0.0.0/0") && !l.contains("md5") && !l.contains("trust"))
        );
        assert_eq!(
            pg_hba("10.0.0.0/16", Some("10.0.0.0/16")).len(),
            5,
            "no duplicate line"
        );
        assert_eq!(
            pg_hba("10.0.0.0/16", None).len(),
            5,
            "the cluster's network only"
        );
        // The default "anywhere" reaches pg_hba only for a cluster with public addresses.
        assert_eq!(clients_range("0.0.0.0/0", false), None);
        assert_eq!(clients_range("0.0.0.0/0", true), Some("0.0.0.0/0"));
        assert_eq!(clients_range("10.20.0.0/16", false), Some("10.20.0.0/16"));
        let (secrets, peers, pem) = (secrets(), peers(), member_pem("m1"));
        let patroni = patroni_config(&setup("m1", "10.0.1.11", false, &peers, &secrets, &pem));
        assert_eq!(patroni["postgresql"]["pg_hba"], json!(hba));
        assert_eq!(
            patroni["postgresql"]["authentication"]["replication"]["sslmode"],
            "verify-ca"
        );
        assert_eq!(patroni["postgresql"]["parameters"]["ssl"], "on");
    }

    #[test]
    fn timings_are_berths_and_checked() {
        let (secrets, peers, pem) = (secrets(), peers(), member_pem("m1"));
        let mut data = setup("m1", "10.0.1.11", false, &peers, &secrets, &pem);
        let patroni = patroni_config(&data);
        let dcs = &patroni["bootstrap"]["dcs"];
        assert_eq!(
            (
                dcs["ttl"].as_u64(),
                dcs["loop_wait"].as_u64(),
                dcs["retry_timeout"].as_u64()
            ),
            (Some(7), Some(1), Some(3))
        );
        assert_eq!(dcs["synchronous_mode"], true);
        assert_eq!(
            dcs["postgresql"]["parameters"]["max_connections"], "200",
            "oltp applies"
        );
        data.timings = Timings {
            ttl: 10,
            loop_wait: 5,
            retry_timeout: 3,
        };
        let err = render(&data).unwrap_err().to_string();
        assert!(err.contains("exceeds ttl"), "{err}");
    }

    #[test]
    fn unsafe_values_are_refused() {
        let (secrets, peers, pem) = (secrets(), peers(), member_pem("m1"));
        let mut bad = secrets.clone();
        bad.admin_password = "x'; DROP ROLE postgres; --".into();
        assert!(render(&setup("m1", "10.0.1.11", false, &peers, &bad, &pem)).is_err());
        assert!(
            render(&setup(
                "m1",
                "10.0.1.11; reboot",
                false,
                &peers,
                &secrets,
                &pem
            ))
            .is_err()
        );
        assert!(
            render(&setup("m9", "10.0.9.9", false, &peers, &secrets, &pem)).is_err(),
            "not a peer"
        );
    }
}
