//! One error type for the HTTP layer. Every refusal is the OSB error shape
//! `{"error": "<Code>", "description": "..."}`; a 5xx logs its full cause and tells the client nothing more.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or names something the catalog does not have.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or wrong broker credentials.
    #[error("missing or wrong broker credentials")]
    Unauthorized,
    /// 404: the thing does not exist (or is not ready to be shown).
    #[error("{0}")]
    NotFound(String),
    /// 405: the path exists, the method does not.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// 403: the caller may not do this (a lock key that does not match).
    #[error("{0}")]
    Forbidden(String),
    /// 409: a resource with this id exists with different attributes.
    #[error("{0}")]
    Conflict(String),
    /// 423: the resource is locked by someone else (a preset lock).
    #[error("{0}")]
    Locked(String),
    /// 412: `X-Broker-API-Version` missing or too old.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 413: the body is larger than the configured limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415: a body that says it is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422 `AsyncRequired`: the operation needs `accepts_incomplete=true`.
    #[error("this operation runs asynchronously; repeat the request with accepts_incomplete=true")]
    AsyncRequired,
    /// 422 `ConcurrencyError`: another operation on the same resource is in progress.
    #[error("{0}")]
    Concurrency(String),
    /// 422 without an OSB code: a change the broker does not support (a plan change of a plan that is not
    /// `plan_updateable`).
    #[error("{0}")]
    Unprocessable(String),
    /// 422 `MaintenanceInfoConflict`: `maintenance_info.version` does not match the plan's.
    #[error("{0}")]
    MaintenanceInfoConflict(String),
    /// 429: too many failed logins from this source; retry after this many seconds.
    #[error("too many failed logins from this address; retry after {0} seconds")]
    TooManyRequests(u64),
    /// 500: a bug or a broken dependency. The chain is logged, never sent.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
    /// 500 `OperationFailed`: an operation answered synchronously failed (the platform cleans up, per OSB).
    #[error("{0}")]
    OperationFailed(String),
    /// 504 `OperationTimedOut`: an operation answered synchronously did not finish in time. A 5xx, not a 408:
    /// OSB platforms clean up (orphan mitigation) after a 5xx on provision and bind, never after a 408.
    #[error("{0}")]
    OperationTimedOut(String),
    /// 503: the broker's database cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::BadRequest(msg.into())
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Locked(_) => StatusCode::LOCKED,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::AsyncRequired
            | Self::Concurrency(_)
            | Self::Unprocessable(_)
            | Self::MaintenanceInfoConflict(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) | Self::OperationFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::OperationTimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OSB `error` code. The spec defines the 422 codes; the others are berth's, in the same style.
    pub fn code(&self) -> &'static str {
        match self {
            Self::AsyncRequired => "AsyncRequired",
            Self::Concurrency(_) => "ConcurrencyError",
            Self::MaintenanceInfoConflict(_) => "MaintenanceInfoConflict",
            Self::OperationFailed(_) => "OperationFailed",
            Self::OperationTimedOut(_) => "OperationTimedOut",
            other => code_for_status(other.status_code()),
        }
    }
}

/// The `error` code berth uses for a status that has no OSB-defined code.
pub(crate) fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        StatusCode::REQUEST_TIMEOUT => "RequestTimeout",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::CONFLICT => "Conflict",
        StatusCode::LOCKED => "Locked",
        StatusCode::PRECONDITION_FAILED => "PreconditionFailed",
        StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLarge",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
        StatusCode::UNPROCESSABLE_ENTITY => "UnprocessableEntity",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
        s if s.is_server_error() => "InternalError",
        _ => "Error",
    }
}

/// The OSB error shape, the body of every refusal.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A code a program can act on: OSB's (`AsyncRequired`, `ConcurrencyError`, `MaintenanceInfoConflict`, ...)
    /// or berth's in the same style (`BadRequest`, `NotFound`, ...).
    #[schema(example = "AsyncRequired")]
    pub error: String,
    /// What went wrong, for a person.
    pub description: String,
}

/// The OSB error body for `status`.
pub(crate) fn error_body(status: StatusCode, code: &str, description: &str) -> Response {
    let body = ErrorBody {
        error: code.to_string(),
        description: description.to_string(),
    };
    (status, Json(body)).into_response()
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && matches!(
                db.code().as_deref(),
                Some(UNTRANSLATABLE_CHARACTER | CHARACTER_NOT_IN_REPERTOIRE)
            )
        {
            // The extractors name the field for NULs; this catches any text they did not see.
            return Self::BadRequest(format!(
                "the request holds text the broker cannot store: {}",
                db.message()
            ));
        }
        if is_connection_error(&err) {
            broker::db::note_connection_failure();
            tracing::warn!(error = %err, "the broker's database is not answering");
            return Self::Unavailable(
                "the broker's database is not answering; retry the request".into(),
            );
        }
        Self::Internal(anyhow::Error::new(err).context("querying the broker's database"))
    }
}

/// SQLSTATE 22P05: e.g. `\u0000` in jsonb.
const UNTRANSLATABLE_CHARACTER: &str = "22P05";
/// SQLSTATE 22021: e.g. a 0x00 byte in text.
const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";

/// Whether `err` says the database could not be reached (as opposed to refusing a statement): no connection
/// from the pool in time, a broken or refused connection, or a server shutting down (SQLSTATE class 57P, 08).
pub fn is_connection_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let description = match &self {
            Self::Internal(err) => {
                tracing::error!(error = format!("{err:#}"), "request failed");
                "internal error in the broker; the operator can find the cause in its log"
                    .to_string()
            }
            other => other.to_string(),
        };
        let mut response = error_body(status, self.code(), &description);
        if let Self::TooManyRequests(secs) = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="berth""#),
            );
        }
        response
    }
}

/// Shorthand for handler results.
pub type ApiResult<T> = Result<T, ApiError>;
