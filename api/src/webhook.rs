//! The per-operation webhook: `parameters.webhook = {url, secret}` or the Akkeris query form
//! `?webhook=URL&secret=S`. Taken out of the parameters before they are stored; the secret is sealed. The
//! target must pass the operator's policy (`broker::webhook_target`).

use broker::{crypto::Cipher, webhook_target::TargetPolicy};
use serde_json::Value;

use crate::error::{ApiError, ApiResult};

/// Removes `webhook` from `parameters` and returns the webhook to record on the task, with its secret sealed.
/// `parameters` wins over the query form when both are given.
pub fn take(
    parameters: &mut Value,
    query_url: Option<&str>,
    query_secret: Option<&str>,
    cipher: &Cipher,
    targets: &TargetPolicy,
) -> ApiResult<Option<(String, Vec<u8>)>> {
    let from_parameters = parameters
        .as_object_mut()
        .and_then(|m| m.remove("webhook"))
        .filter(|v| !v.is_null());
    let (url, secret) = match from_parameters {
        Some(Value::Object(map)) => match (map.get("url"), map.get("secret")) {
            (Some(Value::String(url)), Some(Value::String(secret))) => {
                (url.clone(), secret.clone())
            }
            _ => {
                return Err(ApiError::bad_request(
                    "parameters.webhook must be an object with string fields `url` and `secret`",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                "parameters.webhook must be an object {\"url\": ..., \"secret\": ...}",
            ));
        }
        None => match (query_url, query_secret) {
            (None, None) => return Ok(None),
            (Some(url), Some(secret)) => (url.to_string(), secret.to_string()),
            _ => {
                return Err(ApiError::bad_request(
                    "the query parameters `webhook` and `secret` must be given together",
                ));
            }
        },
    };
    let parsed = url::Url::parse(&url).map_err(|e| {
        ApiError::bad_request(format!("webhook url {url:?} is not a valid URL: {e}"))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(format!(
            "webhook url {url:?} must be an http:// or https:// URL with a host"
        )));
    }
    if secret.is_empty() {
        return Err(ApiError::bad_request("webhook secret must not be empty"));
    }
    // Metadata, link-local and (unless allowed) loopback targets; the worker checks again after DNS.
    targets
        .check_url(&parsed)
        .map_err(|refused| ApiError::bad_request(refused.to_string()))?;
    Ok(Some((url, cipher.seal(secret.as_bytes()))))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strips_and_seals() {
        let cipher = Cipher::from_key(&[1; 32]);
        let mut params = json!({"a": 1, "webhook": {"url": "https://x.example/h", "secret": "s3"}});
        let any = TargetPolicy::default();
        let (url, sealed) = take(&mut params, None, None, &cipher, &any)
            .unwrap()
            .unwrap();
        assert_eq!(params, json!({"a": 1}));
        assert_eq!(url, "https://x.example/h");
        assert_eq!(cipher.open(&sealed).unwrap(), b"s3");

        let mut params = json!({});
        assert!(take(&mut params, Some("ftp://x"), Some("s"), &cipher, &any).is_err());
        assert!(take(&mut params, Some("http://x"), Some(""), &cipher, &any).is_err());
        assert!(take(&mut params, Some("http://x"), None, &cipher, &any).is_err());
        assert!(
            take(&mut params, Some("http://x/h"), Some("s"), &cipher, &any)
                .unwrap()
                .is_some()
        );
        assert!(
            take(&mut params, None, None, &cipher, &any)
                .unwrap()
                .is_none()
        );
    }
}
