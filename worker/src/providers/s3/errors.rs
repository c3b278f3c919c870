//! S3 and IAM errors sorted, in one place, into "try again" and "a person must act". Both SDKs share
//! `SdkError` and `ProvideErrorMetadata`, so one function serves both. Messages carry the error code and
//! S3's message, never a request (a request may carry a secret key).

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::registry::TaskError;

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

/// The error's code (`NoSuchBucket`, `EntityAlreadyExists`, ...), when the service sent one. A HEAD request
/// has no body, so a 404 there has no code: it reads as `NotFound`.
pub fn code<E: ProvideErrorMetadata, R: HttpStatus>(err: &SdkError<E, R>) -> Option<String> {
    match err {
        SdkError::ServiceError(service) => service
            .err()
            .code()
            .map(str::to_string)
            .or_else(|| (service.raw().status_code() == 404).then(|| "NotFound".to_string())),
        _ => None,
    }
}

/// HTTP status of a raw response (the SDK's response type, behind a trait so tests need no SDK types).
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Maps an SDK error met while doing `what` to Retryable or Fatal. `store` names the store in messages
/// ("AWS", "the S3-compatible store").
pub fn classify<E, R>(err: SdkError<E, R>, what: &str, store: &str) -> TaskError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: HttpStatus + std::fmt::Debug,
{
    let status = match &err {
        SdkError::ServiceError(service) => Some(service.raw().status_code()),
        SdkError::ResponseError(response) => Some(response.raw().status_code()),
        _ => None,
    };
    let code = code(&err).unwrap_or_default();
    let message = match &err {
        SdkError::ServiceError(service) => service.err().message().unwrap_or("").to_string(),
        _ => String::new(),
    };
    let detail = if message.is_empty() {
        code.clone()
    } else {
        format!("{code}: {message}")
    };
    match (&err, code.as_str()) {
        // Timeouts, connection failures, unreadable responses: the network or the store is having a moment.
        (
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_),
            _,
        ) => TaskError::retryable(format!(
            "{what}: {store} did not answer properly ({})",
            error_chain(&err)
        )),
        (_, c) if RETRYABLE.contains(&c) => {
            TaskError::retryable(format!("{what}: {store} is busy ({detail})"))
        }
        _ if status.is_some_and(|s| s >= 500 || s == 429) => TaskError::retryable(format!(
            "{what}: {store} answered HTTP {} ({detail})",
            status.unwrap_or(0)
        )),
        (
            _,
            "AccessDenied"
            | "AccessDeniedException"
            | "UnauthorizedOperation"
            | "AllAccessDisabled",
        ) => TaskError::fatal(format!(
            "{what}: {store} denied berth's identity ({detail}); give it s3:* on the buckets named after \
                 NAME_PREFIX and iam:CreateUser/DeleteUser/ListUsers/CreateAccessKey/DeleteAccessKey/\
                 ListAccessKeys/PutUserPolicy/DeleteUserPolicy/ListUserPolicies, then retry the operation"
        )),
        (
            _,
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "InvalidClientTokenId"
            | "ExpiredToken"
            | "UnrecognizedClientException",
        ) => TaskError::fatal(format!(
            "{what}: {store} does not accept berth's credentials ({detail}); check the configured access key \
                 and secret (AWS_* or S3_COMPATIBLE_*)"
        )),
        (_, "InvalidBucketName") => TaskError::fatal(format!(
            "{what}: the bucket name is not valid for {store} ({detail}); choose a NAME_PREFIX of lower-case \
             letters and digits"
        )),
        (_, "BucketAlreadyExists") => TaskError::fatal(format!(
            "{what}: the bucket name is taken by another account ({detail}); bucket names are global on AWS, so \
             set a more specific NAME_PREFIX"
        )),
        (_, "TooManyBuckets" | "LimitExceeded" | "LimitExceededException") => {
            TaskError::fatal(format!(
                "{what}: an account limit was reached on {store} ({detail}); delete unused buckets or IAM users, or \
             ask for a higher limit"
            ))
        }
        (_, "InvalidLocationConstraint" | "IllegalLocationConstraintException") => {
            TaskError::fatal(format!(
                "{what}: {store} does not accept this region ({detail}); check the `region` parameter and AWS_REGION"
            ))
        }
        (_, "KMS.NotFoundException" | "KMS.DisabledException" | "KMS.AccessDeniedException") => {
            TaskError::fatal(format!(
                "{what}: the KMS key cannot be used ({detail}); check S3_KMS_KEY_ID"
            ))
        }
        (_, "NotImplemented" | "MethodNotAllowed") => TaskError::fatal(format!(
            "{what}: {store} does not support this ({detail}); choose a plan that does not need it"
        )),
        _ => TaskError::fatal(format!(
            "{what}: {store} refused the request ({})",
            if detail.is_empty() {
                error_chain(&err)
            } else {
                detail
            }
        )),
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

#[cfg(test)]
mod tests {
    use aws_sdk_s3::{
        config::http::HttpResponse, error::ErrorMetadata, operation::head_bucket::HeadBucketError,
        primitives::SdkBody,
    };

    use super::*;

    fn service(code: &str, status: u16) -> SdkError<HeadBucketError, HttpResponse> {
        let err =
            HeadBucketError::generic(ErrorMetadata::builder().code(code).message("m").build());
        let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
        SdkError::service_error(err, raw)
    }

    #[test]
    fn throttling_and_5xx_retry_and_refusals_say_what_to_fix() {
        for (code, status) in [
            ("SlowDown", 503),
            ("Throttling", 400),
            ("InternalError", 500),
            ("Odd", 502),
        ] {
            let e = classify(service(code, status), "doing it", "AWS");
            assert!(!e.is_fatal(), "{code} {status}: {e}");
        }
        let timeout: SdkError<HeadBucketError, HttpResponse> = SdkError::timeout_error("slow");
        assert!(!classify(timeout, "doing it", "AWS").is_fatal());
        for (code, hint) in [
            ("AccessDenied", "iam:CreateUser"),
            ("InvalidBucketName", "NAME_PREFIX"),
            ("BucketAlreadyExists", "NAME_PREFIX"),
            ("InvalidAccessKeyId", "access key"),
        ] {
            let e = classify(service(code, 403), "creating the bucket", "AWS");
            assert!(e.is_fatal(), "{code}");
            let text = e.to_string();
            assert!(
                text.starts_with("creating the bucket: ") && text.contains(hint),
                "{text}"
            );
        }
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
}
