//! The dashboard: a server-rendered page per instance behind a signed, expiring link (`dashboard_url`), and the
//! operator overview behind the broker's credentials. Templates (minijinja, auto-escaped HTML) are compiled
//! into the binary; no script runs in the pages, and pictures are inline SVG. docs/dashboard.md says what each
//! page shows and why a link looks the way it does.

pub mod charts;
pub mod instance_page;
pub mod overview;
pub mod text;

use std::{str::FromStr, sync::LazyLock, time::Duration};

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header, uri::Authority},
    response::{IntoResponse, Response},
};
use broker::{crypto::Cipher, dashboard_link, db::instances::InstanceRow};
use minijinja::Environment;
use serde::Serialize;

/// How dashboard links are made: the public URL they start with and how long they last.
#[derive(Debug, Clone)]
pub struct DashboardLinks {
    /// `BROKER_PUBLIC_URL`; `None` = the scheme and `Host` of the request that asks for a link.
    pub public_url: Option<String>,
    /// `DASHBOARD_LINK_TTL_SECS`.
    pub ttl: Duration,
    /// Whether the API serves HTTPS (the scheme of a link made from a request's `Host`).
    pub https: bool,
}

impl Default for DashboardLinks {
    fn default() -> Self {
        Self {
            public_url: None,
            ttl: Duration::from_secs(30 * 24 * 3600),
            https: false,
        }
    }
}

impl DashboardLinks {
    /// A fresh link to the instance's page, good for the TTL from now; `None` when no public URL is set and
    /// the request named no usable `Host`.
    pub fn url_for(
        &self,
        cipher: &Cipher,
        request_headers: &HeaderMap,
        instance: &InstanceRow,
    ) -> Option<String> {
        let base = match &self.public_url {
            Some(url) => url.clone(),
            None => {
                let host = request_headers.get(header::HOST)?.to_str().ok()?;
                // Only a plain host[:port]: nothing a client could use to point the link elsewhere.
                let authority = Authority::from_str(host).ok()?;
                if authority.as_str().contains('@') {
                    return None;
                }
                let scheme = if self.https { "https" } else { "http" };
                format!("{scheme}://{authority}")
            }
        };
        let expires = chrono::Utc::now().timestamp() + self.ttl.as_secs() as i64;
        let query = dashboard_link::sign(cipher, &instance.id, instance.created_at, expires);
        dashboard_link::url(&base, &instance.id, &query)
    }
}

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, source) in [
        ("base.html", include_str!("../../templates/base.html")),
        (
            "instance.html",
            include_str!("../../templates/instance.html"),
        ),
        (
            "overview.html",
            include_str!("../../templates/overview.html"),
        ),
        ("refused.html", include_str!("../../templates/refused.html")),
    ] {
        env.add_template(name, source)
            .unwrap_or_else(|e| panic!("the dashboard template {name} does not compile: {e:#}"));
    }
    env
});

/// Renders `template` with `context` as an HTML answer with `status`; a template error is a plain 500 (and
/// logged), never a half page.
pub fn page(status: StatusCode, template: &str, context: impl Serialize) -> Response {
    let rendered = TEMPLATES
        .get_template(template)
        .and_then(|t| t.render(context));
    match rendered {
        Ok(html) => with_page_headers((status, html).into_response()),
        Err(e) => {
            tracing::error!(template, error = %format!("{e:#}"), "rendering a dashboard page failed");
            with_page_headers(
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page could not be rendered",
                )
                    .into_response(),
            )
        }
    }
}

/// The refusal page: 403 for a link that is not good, 404/410 for an instance that is not there.
pub fn refused(status: StatusCode, title: &str, explanation: &str) -> Response {
    page(
        status,
        "refused.html",
        minijinja::context! { title, explanation },
    )
}

/// Headers of every dashboard page: HTML, never cached (the link in the address is a credential), never sent
/// on as a referrer, no scripts, no framing.
fn with_page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
