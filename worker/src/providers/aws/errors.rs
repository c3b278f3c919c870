//! AWS errors (S3, IAM and EC2 alike) sorted into "try again" and "a person must act". The SDKs share one
//! `SdkError` and `ProvideErrorMetadata` (smithy's, re-exported by each), so one mapping serves all three; a
//! service's own codes are its module's business (`s3::errors`, `ec2_common::errors`) and are looked at first.
//! Messages carry the error code and the service's message, never a request (a request may carry a secret key).

pub use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::registry::TaskError;

/// An operation's error type, as every SDK generates them.
pub trait ServiceError: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static {}
impl<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static> ServiceError for E {}

/// Codes that mean "busy or broken for a moment": back off and retry.
const RETRYABLE: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "SlowDown",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalError",
    "InternalFailure",
    "RequestTimeout",
    "RequestTimeoutException",
    "OperationAborted",
    "ConcurrentModification",
    "ServiceFailure",
];

/// Codes that mean "berth's identity may not do this".
const DENIED: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "AllAccessDisabled",
    "AuthFailure",
];

/// Codes that mean "these keys are not valid here".
const BAD_CREDENTIALS: &[&str] = &[
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "ExpiredToken",
    "UnrecognizedClientException",
];

/// The service an error came from, as messages name it and tell what it needs.
pub struct Service<'a> {
    /// "EC2", "AWS", "the S3-compatible store".
    pub name: &'a str,
    /// What berth's identity must be given there when the service denies it.
    pub permissions: &'a str,
}

/// What the service answered: its code and message, and the HTTP status.
#[derive(Debug, Default)]
pub struct Answer {
    pub code: String,
    pub message: String,
    pub status: Option<u16>,
}

impl Answer {
    pub fn of<E: ProvideErrorMetadata>(err: &SdkError<E>) -> Self {
        let (status, message) = match err {
            SdkError::ServiceError(service) => (
                Some(service.raw().status().as_u16()),
                service.err().message().unwrap_or("").to_string(),
            ),
            SdkError::ResponseError(response) => {
                (Some(response.raw().status().as_u16()), String::new())
            }
            _ => (None, String::new()),
        };
        Self {
            code: code(err).unwrap_or_default(),
            message,
            status,
        }
    }

    /// `Code: message`, or the code alone.
    pub fn detail(&self) -> String {
        if self.message.is_empty() {
            self.code.clone()
        } else {
            format!("{}: {}", self.code, self.message)
        }
    }
}

/// The error's code (`NoSuchBucket`, `EntityAlreadyExists`, ...), when the service sent one. A HEAD request
/// has no body, so a 404 there has no code: it reads as `NotFound`.
pub fn code<E: ProvideErrorMetadata>(err: &SdkError<E>) -> Option<String> {
    match err {
        SdkError::ServiceError(service) => {
            service.err().code().map(str::to_string).or_else(|| {
                (service.raw().status().as_u16() == 404).then(|| "NotFound".to_string())
            })
        }
        _ => None,
    }
}

/// `result`, with an error whose code is one of `fine` turned into `Ok(None)`: what the call was for is so already
/// ("already exists", "already gone"), so a retry after a crash goes on. The services' modules pair it with their
/// classification (`Store::tolerate`, `ec2_common::errors::tolerate`).
// The error is the SDK's own, handed back as the call gave it (boxing it would only move the size).
#[allow(clippy::result_large_err)]
pub fn tolerate_codes<T, E: ProvideErrorMetadata>(
    result: Result<T, SdkError<E>>,
    fine: &[&str],
) -> Result<Option<T>, SdkError<E>> {
    match result {
        Ok(out) => Ok(Some(out)),
        Err(e) if code(&e).is_some_and(|c| fine.contains(&c.as_str())) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Maps an SDK error met while doing `what` on `service` to Retryable or Fatal (the service's own codes are
/// looked at before, by its module).
pub fn classify<E: ServiceError>(err: SdkError<E>, what: &str, service: &Service<'_>) -> TaskError {
    let name = service.name;
    let answer = Answer::of(&err);
    let code = answer.code.as_str();
    let detail = answer.detail();
    // Timeouts, connection failures, unreadable responses: the network or the service is having a moment.
    if matches!(
        err,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    ) {
        return TaskError::retryable(format!(
            "{what}: {name} did not answer properly ({})",
            error_chain(&err)
        ));
    }
    if RETRYABLE.contains(&code) {
        return TaskError::retryable(format!("{what}: {name} is busy ({detail})"));
    }
    if let Some(status) = answer.status.filter(|s| *s >= 500 || *s == 429) {
        return TaskError::retryable(format!("{what}: {name} answered HTTP {status} ({detail})"));
    }
    if DENIED.contains(&code) {
        return TaskError::fatal(format!(
            "{what}: {name} denied berth's identity ({detail}); give it {}, then retry the operation",
            service.permissions
        ));
    }
    if BAD_CREDENTIALS.contains(&code) {
        return TaskError::fatal(format!(
            "{what}: {name} does not accept berth's credentials ({detail}); check the configured access key \
             and secret (AWS_* or S3_COMPATIBLE_*)"
        ));
    }
    if matches!(code, "NotImplemented" | "MethodNotAllowed") {
        return TaskError::fatal(format!(
            "{what}: {name} does not support this ({detail}); choose a plan that does not need it"
        ));
    }
    TaskError::fatal(format!(
        "{what}: {name} refused the request ({})",
        describe(&err)
    ))
}

/// What went wrong, for a message: the service's `Code: message`, else the chain of a network error;
/// never the request (it may carry signed headers).
pub fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    err: &SdkError<E>,
) -> String {
    let detail = Answer::of(err).detail();
    if detail.is_empty() {
        error_chain(err)
    } else {
        detail
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A service's answer with `code` (message "m") and HTTP `status`, for the services' tests.
#[cfg(test)]
pub(crate) fn service_error(
    code: &str,
    status: u16,
) -> SdkError<aws_sdk_s3::operation::head_bucket::HeadBucketError> {
    use aws_sdk_s3::{
        config::http::HttpResponse, error::ErrorMetadata, operation::head_bucket::HeadBucketError,
        primitives::SdkBody,
    };
    let err = HeadBucketError::generic(ErrorMetadata::builder().code(code).message("m").build());
    let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
    SdkError::service_error(err, raw)
}

#[cfg(test)]
mod tests {
    use aws_sdk_s3::{
        config::http::HttpResponse, error::ErrorMetadata, operation::head_bucket::HeadBucketError,
        primitives::SdkBody,
    };

    use super::{service_error as service, *};

    #[test]
    fn codes_are_read_and_a_head_404_is_not_found() {
        assert_eq!(
            code(&service("NoSuchBucket", 404)).as_deref(),
            Some("NoSuchBucket")
        );
        let headless = SdkError::<HeadBucketError, HttpResponse>::service_error(
            HeadBucketError::generic(ErrorMetadata::builder().build()),
            HttpResponse::new(404.try_into().unwrap(), SdkBody::empty()),
        );
        assert_eq!(
            code(&headless).as_deref(),
            Some("NotFound"),
            "a HEAD 404 has no body"
        );
    }

    #[test]
    fn tolerated_codes_read_as_done() {
        let gone: Result<(), _> = Err(service("NoSuchEntity", 404));
        assert!(matches!(tolerate_codes(gone, &["NoSuchEntity"]), Ok(None)));
        let denied: Result<(), _> = Err(service("AccessDenied", 403));
        assert!(tolerate_codes(denied, &["NoSuchEntity"]).is_err());
    }
}
