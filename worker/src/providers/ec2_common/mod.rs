//! What the engines that run VMs on EC2 (`ec2` for the dedicated plans, `ha_ec2` for the `ha` plan) share: the
//! account's settings and one client per region ([`Ec2Account`]), the offers cache ([`offers`]), the tagged
//! resources and the launch ([`vm`]), their teardown ([`teardown`]), what their warm pools share ([`pooled`]), and
//! EC2's own error codes ([`errors`]).

pub mod errors;
pub mod offers;
pub mod pooled;
pub mod teardown;
pub mod vm;

use std::{collections::HashMap, sync::Mutex};

use aws_config::SdkConfig;
use aws_sdk_ec2::{Client, types::Filter};
use broker::config::Settings;
use serde_json::Value;

use super::aws;
pub use super::aws::extra_tags;
use crate::{context::Services, registry::TaskError};

/// The default a plan file gives the create parameter `parameter` (e.g. `postgres_version`), if it gives one:
/// what a warm pool's items, made with no parameters, get.
pub fn plan_default(services: &Services, plan_id: &str, parameter: &str) -> Option<String> {
    let plan = services.catalog.plan_by_id(plan_id)?;
    let create = plan
        .plan
        .schemas
        .service_instance
        .as_ref()?
        .create
        .as_ref()?;
    create.parameters["properties"][parameter]["default"]
        .as_str()
        .map(str::to_string)
}

/// The EC2 settings berth was started with, and one client per region.
pub struct Ec2Account {
    sdk: SdkConfig,
    pub default_region: String,
    clients: Mutex<HashMap<String, Client>>,
    pub on_demand: HashMap<String, f64>,
    ami_x86_64: Option<String>,
    ami_arm64: Option<String>,
    pub subnets: Vec<String>,
    pub allowed_cidr: String,
    pub offers_ttl_secs: u64,
    pub readiness_probe: bool,
}

impl std::fmt::Debug for Ec2Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Account")
            .field("region", &self.default_region)
            .finish_non_exhaustive()
    }
}

impl Ec2Account {
    /// `engine` names the engine in the error when `AWS_REGION` is missing.
    pub fn new(settings: &Settings, engine: &str) -> anyhow::Result<Self> {
        let region = settings
            .aws_region
            .clone()
            .ok_or_else(|| anyhow::anyhow!("AWS_REGION is required for the {engine} engine"))?;
        Ok(Self {
            sdk: aws::sdk_config(settings, &region)?,
            default_region: region,
            clients: Mutex::new(HashMap::new()),
            on_demand: offers::on_demand_prices(settings.ec2_on_demand_prices_file.as_deref())?,
            ami_x86_64: settings.ec2_ami_x86_64.clone(),
            ami_arm64: settings.ec2_ami_arm64.clone(),
            subnets: settings
                .ec2_subnet_ids
                .as_deref()
                .map(|s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            allowed_cidr: settings.ec2_allowed_cidr.clone(),
            offers_ttl_secs: settings.ec2_offers_ttl_secs,
            readiness_probe: settings.ec2_readiness_probe,
        })
    }

    /// An EC2 client for `region` (one per region, kept).
    pub fn client(&self, region: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let config = aws_sdk_ec2::config::Builder::from(&self.sdk)
                    .region(aws_sdk_ec2::config::Region::new(region.to_string()))
                    .build();
                Client::from_conf(config)
            })
            .clone()
    }

    /// The configured image for `arch`, if any (else the newest Debian 12 is looked up).
    pub fn image_for(&self, arch: &str) -> Option<&str> {
        if arch == "arm64" {
            self.ami_arm64.as_deref()
        } else {
            self.ami_x86_64.as_deref()
        }
    }
}

/// The region's available zones, sorted by name.
pub async fn available_zones(client: &Client) -> Result<Vec<String>, TaskError> {
    let zones = client
        .describe_availability_zones()
        .filters(Filter::builder().name("state").values("available").build())
        .send()
        .await
        .map_err(|e| errors::classify(e, "listing availability zones"))?;
    let mut names: Vec<String> = zones
        .availability_zones()
        .iter()
        .filter_map(|z| z.zone_name())
        .map(str::to_string)
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(TaskError::fatal("the region has no available zone"));
    }
    Ok(names)
}

/// The `ssh_keys` parameter.
pub fn ssh_keys(parameters: &Value) -> Vec<String> {
    parameters
        .get("ssh_keys")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
