//! The cluster-wide configuration Patroni keeps in etcd (its `bootstrap.dcs`, then `PATCH /config`): timings,
//! synchronous mode and the Postgres settings every member runs with.

use serde_json::{Map, Value, json};

use super::timings::Timings;
use crate::providers::postgres::tuning;

/// Patroni's etcd namespace: every cluster's keys live under `/berth/<scope>/`.
pub const NAMESPACE: &str = "/berth/";

/// Cluster-wide Postgres settings (kept in etcd, the same on every member): the tuning profile plus what
/// streaming replication and pg_rewind need.
pub fn cluster_parameters(profile: &str) -> Map<String, Value> {
    let mut params: Map<String, Value> = tuning::settings(profile)
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.into())))
        .collect();
    for (k, v) in [
        ("wal_level", "replica"),
        ("hot_standby", "on"),
        ("wal_log_hints", "on"),
        ("max_wal_senders", "12"),
        ("max_replication_slots", "12"),
        ("wal_keep_size", "128MB"),
        ("password_encryption", "scram-sha-256"),
        ("ssl_min_protocol_version", "TLSv1.2"),
    ] {
        params.insert(k.into(), Value::String(v.into()));
    }
    params
}

/// The settings Patroni keeps in etcd for the whole cluster: timings, synchronous mode, Postgres settings.
pub fn dcs_config(timings: Timings, synchronous: bool, profile: &str) -> Value {
    json!({
        "ttl": timings.ttl,
        "loop_wait": timings.loop_wait,
        "retry_timeout": timings.retry_timeout,
        // A replica further behind than 1 MB is not promoted by a failover.
        "maximum_lag_on_failover": 1_048_576,
        "synchronous_mode": synchronous,
        "postgresql": {
            "use_pg_rewind": true,
            "use_slots": true,
            "parameters": cluster_parameters(profile),
        },
    })
}
