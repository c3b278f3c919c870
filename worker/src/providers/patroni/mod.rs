//! What the `ha` plan's engines share (`ha_local`: a cluster on this machine; `ha_ec2`: a VM per member): Patroni's
//! REST API client, the cluster-wide settings Patroni keeps in etcd and their updates, switchover and failover,
//! the cluster's parameters, failure-detection timings, certificates, the roles Patroni logs in as, and a
//! binding's multi-host credentials. Engines import this module; it imports no engine.

pub mod client;
pub mod credentials;
pub mod dcs;
pub mod params;
pub mod settings;
pub mod switchover;
pub mod timings;
pub mod tls;

use broker::crypto::random_password;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use client::{ClusterView, MemberView, Patroni};
pub use params::Params;
pub use timings::Timings;

/// The roles Patroni creates and logs in as (the same on every engine).
pub const SUPERUSER: &str = "postgres";
pub const REPLICATION_USER: &str = "replicator";
pub const REWIND_USER: &str = "rewinder";
/// Basic auth of Patroni's REST API for changes (switchover, failover, configuration, restart).
pub const RESTAPI_USER: &str = "berth";

/// A cluster's generated passwords: the roles Patroni logs in as, and its REST API's.
#[derive(Clone, Serialize, Deserialize)]
pub struct Passwords {
    pub superuser: String,
    pub replication: String,
    pub rewind: String,
    /// Basic auth of Patroni's REST API for changes (switchover, failover, configuration, restart).
    pub restapi: String,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords(<redacted>)")
    }
}

impl Passwords {
    pub fn generate() -> Self {
        Self {
            superuser: random_password(32),
            replication: random_password(32),
            rewind: random_password(32),
            restapi: random_password(32),
        }
    }
}

/// The instance's details for its members and, when one leads, its primary (the one recorded stays while none
/// does).
pub fn roles(members: Value, primary: Option<&str>) -> Value {
    let mut patch = json!({ "members": members });
    if let Some(primary) = primary {
        patch["primary"] = json!(primary);
    }
    patch
}

/// [`roles`], or `None` when `details` record these members and this primary already.
pub fn roles_patch(details: &Value, members: Value, primary: Option<&str>) -> Option<Value> {
    let recorded = (
        details.get("members"),
        details.get("primary").and_then(Value::as_str),
    );
    (recorded != (Some(&members), primary)).then(|| roles(members, primary))
}

/// Records in `patch` that the reconcile loop brought `recovered` back: the instance's counter `counter`
/// (`restarts`, `recoveries`) up by their number, when, and which. Returns the new count.
pub fn record_recovery(
    patch: &mut Value,
    details: &Value,
    counter: &str,
    recovered: &[String],
) -> i64 {
    let count = details.get(counter).and_then(Value::as_i64).unwrap_or(0) + recovered.len() as i64;
    patch[counter] = json!(count);
    patch["last_recovered_at"] = json!(chrono::Utc::now());
    patch["last_recovered"] = json!(recovered);
    count
}
