//! EC2's own codes: "try the next instance type", "not yet" and account limits. The rest of the sorting into
//! "try again" and "a person must act" is every AWS service's ([`aws::errors`](crate::providers::aws::errors)).

pub use crate::providers::aws::errors::code;
use crate::{
    providers::aws::errors::{
        self as aws, Answer, SdkError, Service, ServiceError, tolerate_codes,
    },
    registry::TaskError,
};

/// The service as messages name it, and what berth's identity needs there.
const EC2: Service<'static> = Service {
    name: "EC2",
    permissions: "the ec2 actions listed in docs/dedicated.md (RunInstances, CreateVolume, CreateSecurityGroup, ...)",
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

pub fn is_capacity(code: &str) -> bool {
    NO_CAPACITY.contains(&code)
}

/// Maps an EC2 error met while doing `what`.
pub fn classify<E: ServiceError>(err: SdkError<E>, what: &str) -> TaskError {
    own_codes(&Answer::of(&err), what).unwrap_or_else(|| aws::classify(err, what, &EC2))
}

/// `result`, with the errors whose code is one of `fine` read as `Ok(None)` ("already so") and the others classified
/// as met while doing `what`.
pub fn tolerate<T, E: ServiceError>(
    result: Result<T, SdkError<E>>,
    fine: &[&str],
    what: &str,
) -> Result<Option<T>, TaskError> {
    tolerate_codes(result, fine).map_err(|e| classify(e, what))
}

fn own_codes(answer: &Answer, what: &str) -> Option<TaskError> {
    let Answer { code, message, .. } = answer;
    Some(match code.as_str() {
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
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::aws::errors::service_error as service;

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
