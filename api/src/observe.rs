//! What every request gets for logs and metrics: a request id (the platform's `X-Broker-API-Request-Identity`,
//! or one made up here), echoed on the response and kept for the tasks the request writes
//! ([`broker::request_context`]); a span with that id, the route, the instance and binding ids and the
//! originating user; and a sample of the latency histogram by method, route and status.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderMap, HeaderValue},
    middleware::Next,
    response::Response,
};
use broker::{identity::Actor, telemetry::names};
use tracing::{Span, field};

use crate::{identity, middleware::REQUEST_IDENTITY_HEADER};

/// The longest request id taken from a platform; a longer one (or one with other than visible ASCII) is
/// replaced by one made up here, so what is stored with tasks and logged stays small and printable.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The route label of a request no route matched.
pub const UNMATCHED: &str = "unmatched";

/// Gives the request its id (taken or made up) in the request header itself, runs the rest of the stack with
/// it as the current request id, echoes it, and records the latency.
pub async fn request_id_and_latency(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = usable_request_id(req.headers()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).expect("a request id is visible ASCII");
    req.headers_mut()
        .insert(REQUEST_IDENTITY_HEADER, value.clone());
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_string();
    let mut response = broker::request_context::scope(id, next.run(req)).await;
    response
        .headers_mut()
        .insert(REQUEST_IDENTITY_HEADER, value);
    metrics::histogram!(
        names::HTTP_REQUEST_DURATION,
        "method" => method,
        "route" => route,
        "status" => response.status().as_str().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// The request's span (made by the trace layer, inside [`request_id_and_latency`]): `request_id`, `method`,
/// `route`, and when known `instance_id`, `binding_id` and `user` (platform/user id of the originating
/// identity, never the whole header).
pub fn request_span(req: &Request) -> Span {
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let request_id = req
        .headers()
        .get(REQUEST_IDENTITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let span = tracing::info_span!(
        "request",
        request_id,
        method = %req.method(),
        route = matched.unwrap_or(UNMATCHED),
        instance_id = field::Empty,
        binding_id = field::Empty,
        user = field::Empty,
    );
    if let Some(pattern) = matched {
        for (name, value) in path_ids(pattern, req.uri().path()) {
            span.record(name, value.as_str());
        }
    }
    if let Some(actor) = originating_actor(req.headers()) {
        span.record("user", actor.label().as_str());
    }
    span
}

/// The platform's request id, if it is one berth keeps as it is.
fn usable_request_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(REQUEST_IDENTITY_HEADER)?.to_str().ok()?;
    let usable = !value.is_empty()
        && value.len() <= MAX_REQUEST_ID_LEN
        && value.bytes().all(|b| b.is_ascii_graphic());
    usable.then(|| value.to_string())
}

/// `instance_id` and `binding_id` from a path, by the place their parameters hold in the route's pattern.
fn path_ids(pattern: &str, path: &str) -> Vec<(&'static str, String)> {
    pattern
        .split('/')
        .zip(path.split('/'))
        .filter_map(|(part, value)| {
            let name = match part {
                "{instance_id}" => "instance_id",
                "{binding_id}" => "binding_id",
                _ => return None,
            };
            Some((name, percent_decoded(value)))
        })
        .collect()
}

/// A path segment with its `%XX` escapes decoded (as the route's `Path` extractor sees it).
fn percent_decoded(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who the platform says asked, when it says so in a form berth reads.
fn originating_actor(headers: &HeaderMap) -> Option<Actor> {
    let header = headers.get(identity::HEADER)?;
    if header.len() > identity::MAX_BYTES {
        return None;
    }
    Actor::from_identity(&identity::parse(&String::from_utf8_lossy(
        header.as_bytes(),
    )))
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::STANDARD};

    use super::*;

    #[test]
    fn ids_come_from_the_route_pattern() {
        let ids = path_ids(
            "/v2/service_instances/{instance_id}/service_bindings/{binding_id}",
            "/v2/service_instances/i%20one/service_bindings/b-1",
        );
        assert_eq!(
            ids,
            vec![
                ("instance_id", "i one".to_string()),
                ("binding_id", "b-1".to_string())
            ]
        );
        assert!(path_ids("/v2/catalog", "/v2/catalog").is_empty());
    }

    #[test]
    fn only_short_printable_request_ids_are_kept() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(REQUEST_IDENTITY_HEADER, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(
            usable_request_id(&headers("req-1")).as_deref(),
            Some("req-1")
        );
        assert_eq!(usable_request_id(&headers("has space")), None);
        assert_eq!(usable_request_id(&headers(&"x".repeat(129))), None);
        assert_eq!(usable_request_id(&HeaderMap::new()), None);
    }

    #[test]
    fn the_actor_is_the_platform_and_user_id_only() {
        let mut h = HeaderMap::new();
        let value = STANDARD.encode(br#"{"user_id":"u-7","email":"someone@example.com"}"#);
        h.insert(
            identity::HEADER,
            HeaderValue::from_str(&format!("cloudfoundry {value}")).unwrap(),
        );
        assert_eq!(originating_actor(&h).unwrap().label(), "cloudfoundry/u-7");
    }
}
