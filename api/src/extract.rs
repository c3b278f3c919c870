//! Extractors whose rejections are [`ApiError`]s, so a malformed body, query or path gets an OSB-shaped answer
//! instead of axum's plain text.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Query, Request},
    http::{StatusCode, header, request::Parts},
};
use serde::de::DeserializeOwned;

use crate::{AppState, error::ApiError};

/// A JSON body. Unknown fields are ignored; a missing or mistyped field is a 400 that names it; a body over
/// the limit is a 413; a `Content-Type` other than JSON is a 415. A missing one, and curl's `-d` default
/// (`application/x-www-form-urlencoded`), are read as JSON so plain `curl -d '{...}'` works.
#[derive(Debug, Clone)]
pub struct OsbJson<T>(pub T);

impl<T> FromRequest<AppState> for OsbJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(content_type) = req.headers().get(header::CONTENT_TYPE) {
            let essence = content_type
                .to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            let json_like = essence == "application/json"
                || essence.ends_with("+json")
                || essence == "application/x-www-form-urlencoded";
            if !json_like {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "Content-Type must be application/json, not {essence:?}"
                )));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(state.max_body_bytes)
            } else {
                ApiError::bad_request(format!(
                    "could not read the request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
        parse_json(&bytes).map(OsbJson)
    }
}

/// Parses a JSON body into `T`, describing a failure the way a person fixing the request needs it.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request needs a JSON object as its body",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad_request(format!("invalid request body: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid request body: field `{path}`: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    check_no_nul_in_json(bytes)?;
    Ok(value)
}

/// In valid JSON a NUL can only arrive escaped (`\u0000`): a byte scan rules it out for almost every body, and
/// only a body holding that sequence is parsed again to name the field.
const NUL_ESCAPE: &[u8] = b"\\u0000";

/// 400 naming the first string or key that holds U+0000, which Postgres cannot store (text or jsonb).
fn check_no_nul_in_json(bytes: &[u8]) -> Result<(), ApiError> {
    if !bytes.windows(NUL_ESCAPE.len()).any(|w| w == NUL_ESCAPE) {
        return Ok(());
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Ok(());
    };
    match nul_path(&value, String::new()) {
        Some(path) => Err(ApiError::bad_request(format!(
            "invalid request body: {path} contains the character U+0000, which the broker cannot store"
        ))),
        None => Ok(()),
    }
}

/// Where in `value` the first U+0000 is, as "field `a.b`", "a key of `a`" or "the body".
pub(crate) fn nul_path(value: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    let field = |at: &str| {
        if at.is_empty() {
            "the body".to_string()
        } else {
            format!("field `{at}`")
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => Some(field(&at)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_path(item, format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(if at.is_empty() {
                    "a top-level key".to_string()
                } else {
                    format!("a key of `{at}`")
                });
            }
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            nul_path(item, path)
        }),
        _ => None,
    }
}

/// 400 naming the first query parameter whose name or value holds U+0000 (only `%00` decodes to it).
fn check_no_nul_in_query(query: Option<&str>) -> Result<(), ApiError> {
    let Some(query) = query.filter(|q| q.contains("%00")) else {
        return Ok(());
    };
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if name.contains('\0') || value.contains('\0') {
            let name = name.replace('\0', "\\0");
            return Err(ApiError::bad_request(format!(
                "the query parameter `{name}` contains the character U+0000, which the broker cannot store"
            )));
        }
    }
    Ok(())
}

/// A query string. Unknown keys are ignored; a malformed one is a 400.
#[derive(Debug, Clone)]
pub struct OsbQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for OsbQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        check_no_nul_in_query(parts.uri.query())?;
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| OsbQuery(q))
            .map_err(|rejection| {
                ApiError::bad_request(format!("invalid query string: {}", rejection.body_text()))
            })
    }
}

/// Path parameters, with an OSB-shaped rejection.
#[derive(Debug, Clone)]
pub struct OsbPath<T>(pub T);

impl<T, S> FromRequestParts<S> for OsbPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| OsbPath(p))
            .map_err(|rejection| {
                ApiError::bad_request(format!("invalid path: {}", rejection.body_text()))
            })
    }
}
