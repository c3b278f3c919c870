//! What every `/v2` request passes through: HTTP basic auth and the `X-Broker-API-Version` check; and, for every
//! response, an OSB-shaped body on errors that lower layers answered without one.

use std::{fmt, net::SocketAddr};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use broker::crypto::constant_time_eq;
use secrecy::{ExposeSecret, SecretString};

use crate::{
    AppState,
    auth_throttle::AuthThrottle,
    error::{ApiError, code_for_status, error_body},
};

pub const API_VERSION_HEADER: &str = "x-broker-api-version";
pub const REQUEST_IDENTITY_HEADER: &str = "x-broker-api-request-identity";
/// The oldest OSB minor version berth answers (2.13 added `maintenance_info`).
const MIN_MINOR: u32 = 13;

/// The broker's own credentials, which platforms present with HTTP basic auth, and the per-source count of
/// failed attempts.
pub struct BrokerAuth {
    username: SecretString,
    password: SecretString,
    throttle: AuthThrottle,
}

impl fmt::Debug for BrokerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerAuth(..)")
    }
}

impl BrokerAuth {
    /// With the default throttling of failed attempts ([`crate::auth_throttle::DEFAULT_LIMIT`] per
    /// [`crate::auth_throttle::DEFAULT_WINDOW`]).
    pub fn new(username: SecretString, password: SecretString) -> Self {
        Self {
            username,
            password,
            throttle: AuthThrottle::default(),
        }
    }

    /// `limit` failed attempts per source within `window` before that source gets 429 (0: no limit).
    pub fn with_throttle(mut self, limit: u32, window: std::time::Duration) -> Self {
        self.throttle = AuthThrottle::new(limit, window);
        self
    }

    /// Whether an `Authorization` header carries these credentials. Both parts are always compared, in
    /// constant time, so timing tells nothing about which part was wrong.
    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(value) = authorization.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some((scheme, encoded)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
        let user_ok = constant_time_eq(user, self.username.expose_secret().as_bytes());
        let pass_ok = constant_time_eq(pass, self.password.expose_secret().as_bytes());
        user_ok & pass_ok
    }
}

/// 401 with `WWW-Authenticate: Basic realm="berth"` unless the request carries the broker's credentials; 429 with
/// `Retry-After` while its source address has failed too often (see [`crate::auth_throttle`]). The source is the
/// TCP peer (`ConnectInfo`); a request without one (in-process) is not throttled.
pub async fn require_basic_auth(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(source) = source
        && let Some(wait) = state.auth.throttle.blocked_for(source)
    {
        return ApiError::TooManyRequests(wait.as_secs_f64().ceil().max(1.0) as u64)
            .into_response();
    }
    let authorization = req.headers().get(header::AUTHORIZATION);
    if state.auth.accepts(authorization) {
        return next.run(req).await;
    }
    // Only a presented credential is a guess; a request without one is a client that has not been set up.
    if authorization.is_some()
        && let Some(source) = source
    {
        state.auth.throttle.record_failure(source);
    }
    ApiError::Unauthorized.into_response()
}

/// 412 unless `X-Broker-API-Version` is 2.x with x ≥ 13.
pub async fn require_api_version(req: Request, next: Next) -> Response {
    match check_api_version(req.headers().get(API_VERSION_HEADER)) {
        Ok(()) => next.run(req).await,
        Err(err) => err.into_response(),
    }
}

fn check_api_version(value: Option<&HeaderValue>) -> Result<(), ApiError> {
    let supported = "berth speaks OSB API 2.13 to 2.17; send `X-Broker-API-Version: 2.17`";
    let Some(value) = value else {
        return Err(ApiError::PreconditionFailed(format!(
            "the X-Broker-API-Version header is missing; {supported}"
        )));
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let parsed = text.trim().split_once('.').and_then(|(major, rest)| {
        let minor = rest.split('.').next().unwrap_or(rest);
        Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
    });
    match parsed {
        None => Err(ApiError::PreconditionFailed(format!(
            "X-Broker-API-Version {text:?} is not a version like 2.17; {supported}"
        ))),
        Some((2, minor)) if minor >= MIN_MINOR => Ok(()),
        Some(_) => Err(ApiError::PreconditionFailed(format!(
            "X-Broker-API-Version {text:?} is not supported; {supported}"
        ))),
    }
}

/// Gives an OSB error body to any error response that has no body type of its own (a timeout, a rejection
/// from a layer), so clients always get `{"error", "description"}`.
pub async fn osb_error_bodies(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if status.as_u16() < 400 || response.headers().contains_key(header::CONTENT_TYPE) {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let description = match status {
        StatusCode::REQUEST_TIMEOUT => {
            "the broker did not answer in time; retry the request".to_string()
        }
        other => other
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string(),
    };
    let (new_parts, body) = error_body(status, code_for_status(status), &description).into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in &new_parts.headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, body)
}

/// 404 for paths berth does not serve.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such path in the OSB API".into())
}

/// 405 for a known path with a method it does not take.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Answers this process has given, by status class (1xx..5xx), for `/metrics`.
#[derive(Debug, Default)]
pub struct RequestCounts {
    by_class: [std::sync::atomic::AtomicU64; 5],
}

impl RequestCounts {
    fn record(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// ("1xx", n) .. ("5xx", n).
    pub fn snapshot(&self) -> [(&'static str, u64); 5] {
        let names = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        std::array::from_fn(|i| {
            (
                names[i],
                self.by_class[i].load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }
}

/// Counts every answer by status class: one relaxed atomic add per request (its state is only the counters,
/// so nothing is cloned per request).
pub async fn count_requests(
    State(counts): State<std::sync::Arc<RequestCounts>>,
    req: Request,
    next: Next,
) -> Response {
    let response = next.run(req).await;
    counts.record(response.status());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let ok = |v: &str| check_api_version(Some(&HeaderValue::from_str(v).unwrap())).is_ok();
        assert!(ok("2.17") && ok("2.13") && ok("2.14") && ok("2.99") && ok(" 2.16.1 "));
        assert!(!ok("2.12") && !ok("1.17") && !ok("3.0") && !ok("two") && !ok("2") && !ok(""));
        assert!(check_api_version(None).is_err());
    }

    #[test]
    fn basic_auth() {
        let auth = BrokerAuth::new("u".into(), "p:w".into());
        let header =
            |s: &str| HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(s))).unwrap();
        assert!(auth.accepts(Some(&header("u:p:w"))));
        assert!(!auth.accepts(Some(&header("u:p"))));
        assert!(!auth.accepts(Some(&header("x:p:w"))));
        assert!(!auth.accepts(Some(&HeaderValue::from_static("Bearer abc"))));
        assert!(!auth.accepts(None));
    }
}

#[cfg(test)]
mod shape_tests {
    use axum::{Router, body::Body, http::Request, routing::get};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn bare_error_statuses_get_an_osb_body() {
        let app = Router::new()
            .route("/slow", get(|| async { StatusCode::REQUEST_TIMEOUT }))
            .route("/fine", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(osb_error_bodies));
        let res = app
            .clone()
            .oneshot(Request::get("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "RequestTimeout");
        assert!(body["description"].as_str().unwrap().contains("retry"));
        let res = app
            .oneshot(Request::get("/fine").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}
