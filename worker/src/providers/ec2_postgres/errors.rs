//! EC2 errors sorted, in one place, into "try the next instance type", "try again" and "a person must act".
//! The generic cases (throttling, 5xx, timeouts, bad keys) are the S3 engine's mapping; EC2's own codes first.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

use crate::{
    providers::s3::errors::{self as common, HttpStatus},
    registry::TaskError,
};

/// Codes that mean "this type cannot run here now": the launch moves on to the next candidate.
const NO_CAPACITY: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "InsufficientFreeAddressesInSubnet",
    "Unsupported",
];

pub fn code<E: ProvideErrorMetadata, R: HttpStatus>(err: &SdkError<E, R>) -> Option<String> {
    common::code(err)
}

pub fn is_capacity(code: &str) -> bool {
    NO_CAPACITY.contains(&code)
}

/// Maps an SDK error met while doing `what`.
pub fn classify<E, R>(err: SdkError<E, R>, what: &str) -> TaskError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: HttpStatus + std::fmt::Debug,
{
    let code = code(&err).unwrap_or_default();
    let message = match &err {
        SdkError::ServiceError(service) => service.err().message().unwrap_or("").to_string(),
        _ => String::new(),
    };
    match code.as_str() {
        "UnauthorizedOperation" | "AccessDenied" | "AuthFailure" => TaskError::fatal(format!(
            "{what}: EC2 denied berth's identity ({code}: {message}); give it the ec2 actions listed in the README \
             (RunInstances, CreateVolume, CreateSecurityGroup, ...), then retry the operation"
        )),
        "RequestLimitExceeded" => TaskError::retryable(format!("{what}: EC2 is throttling berth ({message})")),
        "InstanceLimitExceeded" | "VcpuLimitExceeded" | "VolumeLimitExceeded" | "AddressLimitExceeded" => {
            TaskError::fatal(format!(
                "{what}: an account limit was reached ({code}: {message}); ask AWS for a higher limit or free some"
            ))
        }
        _ => common::classify(err, what, "EC2"),
    }
}
