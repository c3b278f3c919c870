//! A small HTTP client for the broker: basic auth, the OSB version header, OSB error bodies turned into
//! messages, and polling until an operation ends.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::Value;

use crate::progress::{Progress, plain};

pub struct Client {
    base: String,
    user: String,
    password: String,
    http: reqwest::Client,
}

/// `--timeout` ran out while waiting: the operation goes on in the broker. `main` exits with
/// [`TimedOut::EXIT_CODE`] for it.
#[derive(Debug)]
pub struct TimedOut {
    pub waited: Duration,
    pub what: String,
}

impl TimedOut {
    /// The exit code of a wait that ran out (the one `timeout(1)` uses).
    pub const EXIT_CODE: u8 = 124;
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: still in progress after {}s (--timeout); it goes on in the broker, see `berth status`",
            self.what,
            self.waited.as_secs()
        )
    }
}

impl std::error::Error for TimedOut {}

/// Runs `wait` for at most `limit`; past it, a [`TimedOut`] error.
async fn within<T>(
    limit: Duration,
    what: &str,
    wait: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, wait).await {
        Ok(result) => result,
        Err(_) => Err(TimedOut {
            waited: limit,
            what: what.to_string(),
        }
        .into()),
    }
}

/// How often a wait asks the broker again.
const POLL: Duration = Duration::from_millis(500);

impl Client {
    /// From `--url`/`--user`/`--password` (or `BERTH_URL`, `BROKER_USERNAME`, `BROKER_PASSWORD`), else the
    /// embedded default's `.berth/broker-credentials.json`.
    pub fn new(
        url: Option<String>,
        user: Option<String>,
        password: Option<String>,
    ) -> anyhow::Result<Self> {
        let (user, password) = match (user, password) {
            (Some(u), Some(p)) => (u, p),
            _ => embedded_credentials().context(
                "no broker credentials: pass --user/--password (or BROKER_USERNAME/BROKER_PASSWORD), or run in the \
                 folder of an embedded broker (.berth/broker-credentials.json)",
            )?,
        };
        let base = url.unwrap_or_else(|| {
            format!(
                "http://127.0.0.1:{}",
                std::env::var("PORT").unwrap_or_else(|_| "8080".into())
            )
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            user,
            password,
            http,
        })
    }

    /// Sends a request; a 2xx body (or `{}`), else an error with the broker's description.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .header("X-Broker-API-Version", "2.17");
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("reaching the broker at {}", self.base))?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) || status == 410 {
            return Ok((status, value));
        }
        bail!("{}", refusal(&method, path, status, &value, &text))
    }

    /// Polls an OSB last_operation path (with `?operation=` when given) until it is not `in progress`, for at most
    /// `limit`; 410 counts as done (a deprovision). `what` names the thing in the progress line.
    pub async fn wait_last_operation(
        &self,
        path: &str,
        operation: Option<&str>,
        limit: Duration,
        what: &str,
    ) -> anyhow::Result<Value> {
        let path = match operation {
            Some(op) => format!("{path}?operation={op}"),
            None => path.to_string(),
        };
        let mut progress = Progress::start(what);
        let result = within(limit, what, async {
            loop {
                let (status, body) = self.call(Method::GET, &path, None).await?;
                if status == 410 {
                    return Ok(serde_json::json!({ "state": "succeeded", "description": "gone" }));
                }
                progress.step(body["description"].as_str().unwrap_or_default());
                if body["state"] != "in progress" {
                    return Ok(body);
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        progress.finish();
        result
    }

    /// Polls `/berth/v1/tasks/{operation}` until the task is finished, for at most `limit`.
    pub async fn wait_task(
        &self,
        operation: &str,
        limit: Duration,
        what: &str,
    ) -> anyhow::Result<Value> {
        let mut progress = Progress::start(what);
        let result = within(limit, what, async {
            loop {
                let (_, task) = self
                    .call(Method::GET, &format!("/berth/v1/tasks/{operation}"), None)
                    .await?;
                progress.step(task["description"].as_str().unwrap_or_default());
                if task["state"] == "succeeded" || task["state"] == "failed" {
                    return Ok(task);
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        progress.finish();
        result
    }
}

fn embedded_credentials() -> anyhow::Result<(String, String)> {
    let dir = std::env::var("BERTH_DATA_DIR").unwrap_or_else(|_| ".berth".into());
    let text = std::fs::read_to_string(std::path::Path::new(&dir).join("broker-credentials.json"))?;
    let stored: Value = serde_json::from_str(&text)?;
    match (stored["username"].as_str(), stored["password"].as_str()) {
        (Some(u), Some(p)) => Ok((u.to_string(), p.to_string())),
        _ => bail!("broker-credentials.json has no username and password"),
    }
}

/// A refused request as one line: the broker's description first (the OSB error body's), then what was asked and
/// the status and OSB error code.
fn refusal(method: &Method, path: &str, status: u16, body: &Value, text: &str) -> String {
    let description = body["description"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| plain(text.trim()));
    let code = body["error"]
        .as_str()
        .map(|e| format!(" {e}"))
        .unwrap_or_default();
    format!("{} ({method} {path}: {status}{code})", plain(&description))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_leads_with_the_description() {
        let body = serde_json::json!({"error": "ConcurrencyError", "description": "another operation runs"});
        assert_eq!(
            refusal(&Method::PATCH, "/v2/service_instances/a", 422, &body, ""),
            "another operation runs (PATCH /v2/service_instances/a: 422 ConcurrencyError)"
        );
        assert_eq!(
            refusal(&Method::GET, "/x", 502, &Value::Null, "bad gateway\n"),
            "bad gateway (GET /x: 502)"
        );
    }
}
