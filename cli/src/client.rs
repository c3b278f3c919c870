//! A small HTTP client for the broker: basic auth, the OSB version header, OSB error bodies turned into
//! messages, and polling until an operation ends.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::Value;

pub struct Client {
    base: String,
    user: String,
    password: String,
    http: reqwest::Client,
}

/// How long `--wait` waits before giving up.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);

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
        let description = value["description"].as_str().unwrap_or(text.as_str());
        bail!(
            "{method} {path}: {status} {}: {description}",
            value["error"].as_str().unwrap_or("")
        )
    }

    /// Polls an OSB last_operation path until it is not `in progress`; 410 counts as done (a deprovision).
    pub async fn wait_last_operation(&self, path: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut said = String::new();
        loop {
            let (status, body) = self.call(Method::GET, path, None).await?;
            if status == 410 {
                return Ok(serde_json::json!({ "state": "succeeded", "description": "gone" }));
            }
            let description = body["description"].as_str().unwrap_or_default().to_string();
            if description != said {
                eprintln!("  {description}");
                said = description;
            }
            if body["state"] != "in progress" {
                return Ok(body);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "still in progress after {WAIT_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Polls `/berth/v1/tasks/{operation}` until the task is finished.
    pub async fn wait_task(&self, operation: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut said = String::new();
        loop {
            let (_, task) = self
                .call(Method::GET, &format!("/berth/v1/tasks/{operation}"), None)
                .await?;
            let description = task["description"].as_str().unwrap_or_default().to_string();
            if !description.is_empty() && description != said {
                eprintln!("  {description}");
                said = description;
            }
            if task["state"] == "succeeded" || task["state"] == "failed" {
                return Ok(task);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "still running after {WAIT_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
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
