//! Reaching a cluster's members from a worker: their addresses, Patroni's REST API over TLS (verified with the
//! cluster's CA), and the superuser's connections to find the primary.

use std::time::Duration;

use anyhow::Context as _;
use broker::db::instances::InstanceRow;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::{
    HaEc2,
    state::{ClusterState, Member, Secrets},
    user_data::{API_PORT, PG_PORT},
};
use crate::{
    context::Services,
    providers::{
        patroni::{ClusterView, Patroni, SUPERUSER},
        postgres::connect,
    },
    registry::TaskError,
};

/// Where apps and berth reach a member: its Elastic IP with `public_ip`, else its private address.
pub(super) fn host(member: &Member) -> Option<&str> {
    member.public_ip.as_deref().or(member.private_ip.as_deref())
}

/// The members as the instance's details record them (the switchover route checks candidates against it).
pub(super) fn members_details(state: &ClusterState, view: Option<&ClusterView>) -> Value {
    Value::Array(
        state
            .members
            .iter()
            .filter(|m| !m.retiring)
            .map(|m| {
                let seen = view.and_then(|v| v.member(&m.name));
                json!({
                    "name": m.name,
                    "zone": m.zone,
                    "host": host(m),
                    "private_ip": m.private_ip,
                    "public_ip": m.public_ip,
                    "vm_id": m.vm_id,
                    "instance_type": m.instance_type,
                    "role": seen.map(|s| s.role.as_str()),
                    "state": seen.map(|s| s.state.as_str()),
                })
            })
            .collect(),
    )
}

pub(super) fn open_secrets(
    services: &Services,
    instance: &InstanceRow,
) -> Result<Secrets, TaskError> {
    let sealed = instance.secrets.as_ref().ok_or_else(|| {
        TaskError::fatal("the cluster has no stored secrets (did provisioning fail?)")
    })?;
    services
        .cipher
        .open_json(sealed)
        .map_err(|e| TaskError::Fatal(e.context("opening the cluster's secrets")))
}

/// An HTTPS client that trusts the cluster's CA (Patroni's REST API presents the member's certificate).
pub(super) fn patroni_http(secrets: &Secrets) -> Result<reqwest::Client, TaskError> {
    let ca = reqwest::Certificate::from_pem(secrets.ca.cert.as_bytes())
        .map_err(|e| TaskError::Fatal(anyhow::Error::new(e).context("reading the cluster's CA")))?;
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| TaskError::Fatal(anyhow::Error::new(e).context("building the Patroni client")))
}

/// A member's REST API base URL.
pub(super) fn api_base(host: &str) -> String {
    format!("https://{host}:{API_PORT}")
}

pub(super) fn patroni_bases(state: &ClusterState) -> Vec<String> {
    state
        .members
        .iter()
        .filter(|m| !m.retiring)
        .filter_map(host)
        .map(api_base)
        .collect()
}

/// The superuser's connect options for `database` on `host`, over TLS verified against the cluster's CA.
pub(super) fn superuser(host: &str, secrets: &Secrets, database: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host(host)
        .port(PG_PORT)
        .username(SUPERUSER)
        .password(&secrets.passwords.superuser)
        .database(database)
        .ssl_mode(PgSslMode::VerifyCa)
        .ssl_root_cert_from_pem(secrets.ca.cert.as_bytes().to_vec())
        .application_name("berth-worker")
}

/// The member whose PostgreSQL takes writes, asked of each member in turn (no need for Patroni's REST API).
pub(super) async fn find_primary<'a>(
    state: &'a ClusterState,
    secrets: &Secrets,
) -> Result<&'a Member, TaskError> {
    let mut last = String::from("the cluster has no members");
    for member in state.members.iter().filter(|m| !m.retiring) {
        let Some(h) = host(member) else { continue };
        let probe = async {
            let mut conn =
                connect(&superuser(h, secrets, "postgres"), "connecting to a member").await?;
            let replica: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
                .fetch_one(&mut conn)
                .await
                .context("asking a member whether it is the primary")?;
            Ok::<bool, TaskError>(replica)
        };
        match tokio::time::timeout(Duration::from_secs(10), probe).await {
            Ok(Ok(false)) => return Ok(member),
            Ok(Ok(true)) => last = format!("{} is a replica", member.name),
            Ok(Err(e)) => last = format!("{}: {e}", member.name),
            Err(_) => last = format!("{}: no answer within 10 s", member.name),
        }
    }
    Err(TaskError::retryable(format!(
        "no member of the cluster answers as its primary on port {PG_PORT} (a failover may be under way, or this \
         worker cannot reach the members); last: {last}"
    )))
}

/// What still keeps the cluster from being ready, by Patroni's view.
pub(super) fn not_ready(state: &ClusterState, view: &ClusterView) -> Option<String> {
    let members = state.members.iter().filter(|m| !m.retiring);
    view.ready_primary(members.map(|m| m.name.as_str())).err()
}

impl HaEc2 {
    /// Patroni's view of the cluster, when this worker reaches a member's REST API.
    pub(super) async fn view(
        &self,
        state: &ClusterState,
        secrets: &Secrets,
    ) -> Result<ClusterView, TaskError> {
        let http = patroni_http(secrets)?;
        Patroni::at(&http, patroni_bases(state), &secrets.passwords.restapi)
            .cluster()
            .await
            .map_err(TaskError::Retryable)
    }
}
