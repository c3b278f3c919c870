//! Patroni's REST API on each member: the cluster's state (`GET /cluster`), one member's (`GET /patroni`), and
//! the changes berth asks for (switchover, failover, configuration, restart) with the cluster's basic auth.

use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::Value;

use super::RESTAPI_USER;

/// A member as `GET /cluster` lists it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MemberView {
    pub name: String,
    /// `leader`, `sync_standby`, `replica`, …
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped`, `start failed`, …
    pub state: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub lag: Option<Value>,
}

impl MemberView {
    pub fn is_leader(&self) -> bool {
        self.role == "leader"
    }
    pub fn is_running(&self) -> bool {
        matches!(self.state.as_str(), "running" | "streaming")
    }
    /// A replica that replays WAL and is not behind by an unknown amount.
    pub fn is_healthy_replica(&self) -> bool {
        !self.is_leader() && self.is_running() && self.lag.as_ref().is_some_and(Value::is_number)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClusterView {
    pub members: Vec<MemberView>,
}

impl ClusterView {
    pub fn leader(&self) -> Option<&MemberView> {
        self.members
            .iter()
            .find(|m| m.is_leader() && m.is_running())
    }
    pub fn member(&self, name: &str) -> Option<&MemberView> {
        self.members.iter().find(|m| m.name == name)
    }
    pub fn healthy_replicas(&self) -> impl Iterator<Item = &MemberView> {
        self.members.iter().filter(|m| m.is_healthy_replica())
    }

    /// The primary once every one of `members` is it or a healthy replica; else what is still missing.
    pub fn ready_primary<'v>(
        &self,
        members: impl IntoIterator<Item = &'v str>,
    ) -> Result<&MemberView, String> {
        let leader = self.leader().ok_or("no primary elected yet")?;
        let missing: Vec<&str> = members
            .into_iter()
            .filter(|m| {
                *m != leader.name && !self.member(m).is_some_and(|v| v.is_healthy_replica())
            })
            .collect();
        if missing.is_empty() {
            Ok(leader)
        } else {
            Err(format!(
                "waiting for member(s) {} to replicate",
                missing.join(", ")
            ))
        }
    }
}

pub struct Patroni<'a> {
    http: &'a reqwest::Client,
    /// Each member's REST API (`http://host:port`), tried in order.
    bases: Vec<String>,
    password: &'a str,
}

impl<'a> Patroni<'a> {
    /// `bases` are the members' REST APIs' base URLs (`http://127.0.0.1:8008`), `password` the cluster's REST
    /// API password.
    pub fn at(http: &'a reqwest::Client, bases: Vec<String>, password: &'a str) -> Self {
        Self {
            http,
            bases,
            password,
        }
    }

    /// The cluster as the first member that answers sees it.
    pub async fn cluster(&self) -> anyhow::Result<ClusterView> {
        let mut last = None;
        for base in &self.bases {
            let answer = self
                .http
                .get(format!("{base}/cluster"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            match answer {
                Ok(response) => return response.json().await.context("reading Patroni's /cluster"),
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow::anyhow!(
            "no member's Patroni REST API answers: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    /// One member's own state (`GET /patroni` of the REST API at `base`); `None` when it does not answer.
    pub async fn member_state(&self, base: &str) -> Option<Value> {
        let response = self
            .http
            .get(format!("{base}/patroni"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// A change (POST/PATCH) sent to any member that answers, with the REST API's basic auth. `Ok((status, text))`
    /// whatever the status: the caller knows which refusals are final.
    pub async fn change(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<(u16, String)> {
        let mut last = None;
        for base in &self.bases {
            let sent = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .basic_auth(RESTAPI_USER, Some(self.password))
                .json(body)
                .timeout(Duration::from_secs(60))
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    return Ok((
                        status,
                        response.text().await.unwrap_or_default().trim().to_string(),
                    ));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow::anyhow!(
            "no member's Patroni REST API answers: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    /// Restarts one member's Postgres (its REST API at `base`) when a setting needs it (`POST /restart`, only
    /// if pending).
    pub async fn restart_pending(&self, base: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{base}/restart"))
            .basic_auth(RESTAPI_USER, Some(self.password))
            .json(&serde_json::json!({ "restart_pending": true }))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .context("asking Patroni to restart a member")?;
        let status = response.status();
        // 503 "restart conditions are not satisfied": nothing pending.
        anyhow::ensure!(
            status.is_success() || status.as_u16() == 503,
            "Patroni refused the restart ({status}): {}",
            response.text().await.unwrap_or_default().trim()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_view_reads_patronis_answer() {
        let view: ClusterView = serde_json::from_value(serde_json::json!({"members": [
            {"name": "m1", "role": "sync_standby", "state": "running", "host": "127.0.0.1", "port": 5433, "lag": 0},
            {"name": "m2", "role": "replica", "state": "running", "port": 5434, "lag": "unknown"},
            {"name": "m3", "role": "leader", "state": "running", "port": 5435},
        ]}))
        .unwrap();
        assert_eq!(view.leader().unwrap().name, "m3");
        let healthy: Vec<&str> = view.healthy_replicas().map(|m| m.name.as_str()).collect();
        assert_eq!(healthy, ["m1"]);
    }
}
