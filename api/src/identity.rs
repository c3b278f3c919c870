//! `X-Broker-API-Originating-Identity: <platform> <base64 JSON>`: who on the platform asked. Parsed leniently
//! and recorded with the task; a header that does not parse is kept raw. Refused (400) only when it is larger
//! than [`MAX_BYTES`] or holds U+0000, which the broker could not store.

use axum::{extract::FromRequestParts, http::request::Parts};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD},
};
use serde_json::{Value, json};

use crate::{error::ApiError, extract::nul_path};

pub const HEADER: &str = "x-broker-api-originating-identity";
/// The largest header stored with a task. Platforms send a user id or two; 4 KiB leaves room to spare.
pub const MAX_BYTES: usize = 4096;

/// The parsed header, if the request had one.
#[derive(Debug, Clone, Default)]
pub struct OriginatingIdentity(pub Option<Value>);

impl<S: Send + Sync> FromRequestParts<S> for OriginatingIdentity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(header) = parts.headers.get(HEADER) else {
            return Ok(Self(None));
        };
        if header.len() > MAX_BYTES {
            return Err(ApiError::bad_request(format!(
                "header X-Broker-API-Originating-Identity is {} bytes; at most {MAX_BYTES} are accepted",
                header.len()
            )));
        }
        let value = parse(&String::from_utf8_lossy(header.as_bytes()));
        if let Some(path) = nul_path(&value, String::new()) {
            let within = path.replace("field `", "`").replace("value.", "");
            return Err(ApiError::bad_request(format!(
                "header X-Broker-API-Originating-Identity contains the character U+0000 (at {within}), which the \
                 broker cannot store"
            )));
        }
        Ok(Self(Some(value)))
    }
}

/// `{"platform": "cloudfoundry", "value": {...}}`, or `{"platform": ..., "raw": "..."}` when the value is not
/// base64-encoded JSON.
pub fn parse(header: &str) -> Value {
    let header = header.trim();
    let (platform, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    let rest = rest.trim();
    let decoded = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(rest).ok())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    match decoded {
        Some(value) => json!({ "platform": platform, "value": value }),
        None => json!({ "platform": platform, "raw": rest }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cloud_foundry_and_keeps_garbage() {
        let b64 = STANDARD.encode(br#"{"user_id":"683ea748"}"#);
        assert_eq!(
            parse(&format!("cloudfoundry {b64}")),
            json!({"platform": "cloudfoundry", "value": {"user_id": "683ea748"}})
        );
        assert_eq!(
            parse("kubernetes not-base64!"),
            json!({"platform": "kubernetes", "raw": "not-base64!"})
        );
        assert_eq!(parse("lonely"), json!({"platform": "lonely", "raw": ""}));
    }
}
