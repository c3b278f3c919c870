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

/// Codes that mean "not yet": EC2 is eventually consistent (a VM just launched may be unknown for a moment) and
/// volumes and groups free up only once their VM is gone.
const NOT_YET: &[&str] = &[
    "InvalidInstanceID.NotFound",
    "InvalidVolume.NotFound",
    "InvalidAllocationID.NotFound",
    "InvalidGroup.NotFound",
    "IncorrectState",
    "IncorrectInstanceState",
    "VolumeInUse",
    "DependencyViolation",
    "InvalidNetworkInterface.InUse",
    "InvalidNetworkInterfaceID.NotFound",
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
        "RequestLimitExceeded" => {
            TaskError::retryable(format!("{what}: EC2 is throttling berth ({message})"))
        }
        c if NOT_YET.contains(&c) => {
            TaskError::retryable(format!("{what}: not yet ({code}: {message})"))
        }
        "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "VolumeLimitExceeded"
        | "AddressLimitExceeded" => TaskError::fatal(format!(
            "{what}: an account limit was reached ({code}: {message}); ask AWS for a higher limit or free some"
        )),
        _ => common::classify(err, what, "EC2"),
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::{
        config::http::HttpResponse, error::ErrorMetadata,
        operation::run_instances::RunInstancesError,
    };
    use aws_sdk_s3::primitives::SdkBody;

    use super::*;

    fn service(code: &str, status: u16) -> SdkError<RunInstancesError, HttpResponse> {
        let err =
            RunInstancesError::generic(ErrorMetadata::builder().code(code).message("m").build());
        SdkError::service_error(
            err,
            HttpResponse::new(status.try_into().unwrap(), SdkBody::empty()),
        )
    }

    #[test]
    fn capacity_moves_on_waits_retry_and_refusals_say_what_to_fix() {
        for c in [
            "InsufficientInstanceCapacity",
            "MaxSpotInstanceCountExceeded",
            "SpotMaxPriceTooLow",
        ] {
            assert!(is_capacity(c), "{c}");
        }
        assert!(!is_capacity("UnauthorizedOperation"));
        for (c, status) in [
            ("RequestLimitExceeded", 503),
            ("VolumeInUse", 400),
            ("InvalidInstanceID.NotFound", 400),
            ("InternalError", 500),
        ] {
            assert!(!classify(service(c, status), "x").is_fatal(), "{c}");
        }
        for (c, hint) in [
            ("UnauthorizedOperation", "RunInstances"),
            ("VcpuLimitExceeded", "limit"),
            ("InvalidParameterValue", "refused"),
        ] {
            let e = classify(service(c, 400), "launching the VM");
            assert!(e.is_fatal(), "{c}");
            assert!(
                e.to_string().starts_with("launching the VM: ") && e.to_string().contains(hint),
                "{e}"
            );
        }
    }
}
