//! The `ha` plan's parameters as the `ha_ec2` engine reads them: the cluster's (as `ha_local` reads them) and
//! the dedicated plans' hardware parameters, plus where members go (`zones`) and how they are paid (`spot`).

use broker::ec2::Requirements;
use serde_json::Value;

use crate::{
    providers::{ec2_common, patroni},
    registry::TaskError,
};

pub const DEFAULT_VERSION: &str = "17";

#[derive(Debug, Clone)]
pub struct Params {
    pub cluster: patroni::Params,
    pub requirements: Requirements,
    pub region: Option<String>,
    /// Zones to spread members over; empty = the region's available zones.
    pub zones: Vec<String>,
    pub public_ip: bool,
    pub ssh_keys: Vec<String>,
    pub tags: Vec<(String, String)>,
}

impl Params {
    pub fn of(parameters: &Value) -> Result<Self, TaskError> {
        let cluster = patroni::Params::of(parameters)?;
        let spot = parameters
            .get("spot")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let requirements =
            Requirements::from_parameters(parameters, spot).map_err(TaskError::fatal)?;
        if requirements.local_storage {
            return Err(TaskError::fatal(
                "storage_type `local` is not offered by the ha plan's ec2 engine: use `network` (an EBS disk per member)",
            ));
        }
        if requirements.zone.is_some() {
            return Err(TaskError::fatal(
                "the ha plan spreads members over zones: use `zones` (a list), not `zone`",
            ));
        }
        let tags = ec2_common::extra_tags(parameters)?;
        // Members read their tags from the instance metadata, which refuses to launch a VM with keys it cannot
        // serve.
        if let Some((key, _)) = tags
            .iter()
            .find(|(k, _)| k.contains('/') || k.contains(' '))
        {
            return Err(TaskError::fatal(format!(
                "tag {key:?}: the ha plan's VMs expose their tags to their instance metadata, whose keys cannot hold \
                 `/` or spaces"
            )));
        }
        let zones: Vec<String> = parameters
            .get("zones")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            cluster,
            requirements,
            region: parameters
                .get("region")
                .and_then(Value::as_str)
                .map(str::to_string),
            zones,
            public_ip: parameters
                .get("public_ip")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ssh_keys: ec2_common::ssh_keys(parameters),
            tags,
        })
    }

    pub fn postgres_version(&self) -> &str {
        self.cluster
            .server
            .postgres_version
            .as_deref()
            .unwrap_or(DEFAULT_VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hardware_zones_and_spot() {
        let p = Params::of(&json!({
            "members": 5, "spot": true, "cpu_min": 4, "zones": ["us-east-1a", "us-east-1b"], "tags": {"team": "x"}
        }))
        .unwrap();
        assert_eq!(p.cluster.members, 5);
        assert!(p.requirements.spot);
        assert_eq!(p.requirements.cpu_min, 4);
        assert_eq!(p.zones, ["us-east-1a", "us-east-1b"]);
        assert_eq!(p.postgres_version(), "17");
        assert_eq!(p.tags, [("team".to_string(), "x".to_string())]);
        let p = Params::of(&json!({})).unwrap();
        assert!(!p.requirements.spot && p.zones.is_empty() && !p.public_ip);
        for bad in [
            json!({"storage_type": "local"}),
            json!({"zone": "us-east-1a"}),
            json!({"tags": {"berth:instance": "x"}}),
            json!({"tags": {"kubernetes.io/cluster": "x"}}),
            json!({"members": 4}),
        ] {
            assert!(Params::of(&bad).is_err(), "{bad}");
        }
    }
}
