//! A real browser for the page tests: Debian's `chromium`, headless, driven by its `chromedriver` over the W3C
//! WebDriver protocol. The few commands the tests use (open a page, read elements' text and the page source,
//! take a screenshot) are plain JSON over HTTP, so they go through the suite's reqwest client rather than a
//! WebDriver crate and its dependency tree.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::Context;
use base64::Engine;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// The key W3C WebDriver names an element reference with.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session. Dropping it stops chromedriver (and with it the browser).
pub struct Browser {
    driver: Child,
    session_url: String,
    http: reqwest::Client,
    _profile: crate::TestFolder,
}

fn program(names: &[&str]) -> anyhow::Result<String> {
    names
        .iter()
        .find(|n| broker::config::on_path(n))
        .map(|n| n.to_string())
        .with_context(|| {
            format!(
                "none of {names:?} is on the PATH: install Debian's chromium and chromium-driver \
                 (./scripts/test.sh does)"
            )
        })
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session with a fresh profile.
    pub async fn start() -> anyhow::Result<Self> {
        let driver_program = program(&["chromedriver"])?;
        let chromium = program(&["chromium", "chromium-browser"])?;
        let port = crate::free_port()?;
        let driver = Command::new(&driver_program)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {driver_program}"))?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let started = std::time::Instant::now();
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(answer) = ready
                && let Ok(status) = answer.json::<Value>().await
                && status["value"]["ready"] == json!(true)
            {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not get ready on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = crate::TestFolder(
            std::env::temp_dir().join(format!("berth-chromium-{}", uuid::Uuid::new_v4().simple())),
        );
        std::fs::create_dir_all(&profile.0)?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": which(&chromium)?,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1800", "--hide-scrollbars", "--no-first-run",
                    format!("--user-data-dir={}", profile.0.display()),
                ],
            },
        }}});
        let answer: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await?
            .json()
            .await?;
        let session = answer["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("chromedriver opened no session: {answer}"))?;
        Ok(Self {
            driver,
            session_url: format!("{base}/session/{session}"),
            http,
            _profile: profile,
        })
    }

    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.session_url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await?.json().await?;
        if let Some(error) = answer["value"]["error"].as_str() {
            anyhow::bail!("WebDriver {path}: {error}: {}", answer["value"]["message"]);
        }
        Ok(answer["value"].clone())
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    /// The page's DOM as HTML.
    pub async fn source(&self) -> anyhow::Result<String> {
        let value = self.command(reqwest::Method::GET, "/source", None).await?;
        Ok(value.as_str().unwrap_or_default().to_string())
    }

    pub async fn title(&self) -> anyhow::Result<String> {
        let value = self.command(reqwest::Method::GET, "/title", None).await?;
        Ok(value.as_str().unwrap_or_default().to_string())
    }

    /// The rendered text of every element `css` selects, in document order.
    pub async fn texts(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let found = self
            .command(
                reqwest::Method::POST,
                "/elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        let mut texts = Vec::new();
        for element in found.as_array().cloned().unwrap_or_default() {
            let id = element[ELEMENT_KEY]
                .as_str()
                .context("an element reference")?;
            let text = self
                .command(reqwest::Method::GET, &format!("/element/{id}/text"), None)
                .await?;
            texts.push(text.as_str().unwrap_or_default().to_string());
        }
        Ok(texts)
    }

    /// The text of the one element `css` selects (an error when none does).
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        self.texts(css)
            .await?
            .into_iter()
            .next()
            .with_context(|| format!("no element matches {css:?}"))
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let value = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().context("a base64 screenshot")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Ends the session and stops chromedriver.
    pub async fn close(mut self) {
        let _ = self
            .http
            .delete(&self.session_url)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let _ = self.driver.start_kill();
        let _ = self.driver.wait().await;
    }
}

/// The full path of a program on the PATH (chromedriver wants the browser's path).
fn which(name: &str) -> anyhow::Result<String> {
    let path = std::env::var_os("PATH").context("PATH is not set")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .with_context(|| format!("{name} is not on the PATH"))
}
