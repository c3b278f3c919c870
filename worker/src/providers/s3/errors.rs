//! The S3 and IAM codes that need their own words (bucket names, account limits, regions, KMS keys); the rest of
//! the sorting into "try again" and "a person must act" is every AWS service's ([`aws::errors`]).

use crate::providers::aws::errors::{self as aws, Answer, SdkError, Service, ServiceError};
use crate::registry::TaskError;

/// What berth's identity needs on the store (the fix when it is denied).
const PERMISSIONS: &str = "s3:* on the buckets named after NAME_PREFIX and iam:CreateUser/DeleteUser/ListUsers/\
     CreateAccessKey/DeleteAccessKey/ListAccessKeys/PutUserPolicy/DeleteUserPolicy/ListUserPolicies";

/// Maps an S3 or IAM error met while doing `what` to Retryable or Fatal. `store` names the store in messages
/// ("AWS", "the S3-compatible store").
pub fn classify<E: ServiceError>(err: SdkError<E>, what: &str, store: &str) -> TaskError {
    let service = Service {
        name: store,
        permissions: PERMISSIONS,
    };
    own_codes(&Answer::of(&err), what, store).unwrap_or_else(|| aws::classify(err, what, &service))
}

fn own_codes(answer: &Answer, what: &str, store: &str) -> Option<TaskError> {
    let detail = answer.detail();
    let fix = match answer.code.as_str() {
        "InvalidBucketName" => format!(
            "the bucket name is not valid for {store} ({detail}); choose a NAME_PREFIX of lower-case letters and \
             digits"
        ),
        "BucketAlreadyExists" => format!(
            "the bucket name is taken by another account ({detail}); bucket names are global on AWS, so set a \
             more specific NAME_PREFIX"
        ),
        "TooManyBuckets" | "LimitExceeded" | "LimitExceededException" => format!(
            "an account limit was reached on {store} ({detail}); delete unused buckets or IAM users, or ask for \
             a higher limit"
        ),
        "InvalidLocationConstraint" | "IllegalLocationConstraintException" => format!(
            "{store} does not accept this region ({detail}); check the `region` parameter and AWS_REGION"
        ),
        "KMS.NotFoundException" | "KMS.DisabledException" | "KMS.AccessDeniedException" => {
            format!("the KMS key cannot be used ({detail}); check S3_KMS_KEY_ID")
        }
        _ => return None,
    };
    Some(TaskError::fatal(format!("{what}: {fix}")))
}

#[cfg(test)]
mod tests {
    use aws_sdk_s3::{config::http::HttpResponse, operation::head_bucket::HeadBucketError};

    use super::*;
    use crate::providers::aws::errors::service_error as service;

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
    }
}
