//! Instance type selection for the `ec2` engine, shared by the worker (which launches the first candidate that
//! has capacity) and the API's price check (which only shows the ordering). Pure: it works on [`Offer`]s the
//! worker caches in the broker database (`db::ec2_offers`) and never calls AWS.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// One instance type in one region as DescribeInstanceTypes describes it, with its latest prices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub instance_type: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub architectures: Vec<String>,
    pub burstable: bool,
    /// Instance store (local NVMe/SSD) size; 0 without one.
    pub instance_storage_gb: u32,
    pub current_generation: bool,
    pub spot_supported: bool,
    /// Latest spot price per availability zone (USD per hour).
    pub spot_prices: BTreeMap<String, f64>,
    /// From the operator's on-demand price list; `None` when the list does not know the type.
    pub on_demand_price: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Lowest hourly price first.
    Cheapest,
    /// Lowest price per resource unit (a vCPU, or 4 GB of RAM) first: more machine for the money.
    Balanced,
    /// A random order of the matching types (spreads instances, and evictions, across types).
    Random,
}

/// What an instance asks of its VM: the hardware parameters of the `dedicated` plans.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirements {
    pub spot: bool,
    pub cpu_min: u32,
    pub cpu_max: Option<u32>,
    pub ram_min_gb: f64,
    pub ram_max_gb: Option<f64>,
    /// `storage_type: local`: the type must have an instance store of at least `storage_min_gb`.
    pub local_storage: bool,
    pub storage_min_gb: u32,
    pub instance_types: Vec<String>,
    pub instance_types_to_avoid: Vec<String>,
    /// A regular expression on the type name (`^r6`).
    pub instance_family: Option<String>,
    pub cpu_arch: Option<String>,
    pub allow_burstable: bool,
    pub max_price: Option<f64>,
    pub strategy: Strategy,
    pub zone: Option<String>,
}

pub const DEFAULT_CPU_MIN: u32 = 2;
pub const DEFAULT_STORAGE_GB: u32 = 20;

/// A type that fits, priced for this instance (in `zone`, the cheapest zone for spot unless one was asked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Candidate {
    pub instance_type: String,
    pub price: Option<f64>,
    pub zone: Option<String>,
    pub vcpus: u32,
    pub memory_gb: f64,
    pub arch: String,
}

impl Requirements {
    /// Reads the plan parameters (already checked against the plan's schema; this checks what a schema
    /// cannot: ranges that contradict each other, a family that is not a regular expression).
    pub fn from_parameters(parameters: &Value, spot: bool) -> Result<Self, String> {
        let int = |key: &str| {
            parameters
                .get(key)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
        };
        let num = |key: &str| parameters.get(key).and_then(Value::as_f64);
        let text = |key: &str| {
            parameters
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let list = |key: &str| -> Vec<String> {
            parameters
                .get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let strategy = match text("selection_strategy").as_deref() {
            None | Some("balanced") => Strategy::Balanced,
            Some("cheapest") => Strategy::Cheapest,
            Some("random") => Strategy::Random,
            Some(other) => {
                return Err(format!(
                    "selection_strategy {other:?}: use cheapest, balanced or random"
                ));
            }
        };
        let req = Self {
            spot,
            cpu_min: int("cpu_min").unwrap_or(DEFAULT_CPU_MIN),
            cpu_max: int("cpu_max"),
            ram_min_gb: num("ram_min").unwrap_or(0.0),
            ram_max_gb: num("ram_max"),
            local_storage: text("storage_type").as_deref() == Some("local"),
            storage_min_gb: int("storage_min").unwrap_or(DEFAULT_STORAGE_GB),
            instance_types: list("instance_types"),
            instance_types_to_avoid: list("instance_types_to_avoid"),
            instance_family: text("instance_family"),
            cpu_arch: text("cpu_arch"),
            allow_burstable: parameters
                .get("allow_burstable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_price: num("max_price"),
            strategy,
            zone: text("zone"),
        };
        if req.cpu_max.is_some_and(|max| max < req.cpu_min) {
            return Err(format!(
                "cpu_max {} is below cpu_min {}",
                req.cpu_max.unwrap_or(0),
                req.cpu_min
            ));
        }
        if req.ram_max_gb.is_some_and(|max| max < req.ram_min_gb) {
            return Err("ram_max is below ram_min".into());
        }
        if let Some(family) = &req.instance_family {
            regex::Regex::new(family)
                .map_err(|e| format!("instance_family is not a regular expression: {e}"))?;
        }
        Ok(req)
    }

    fn fits(&self, offer: &Offer, family: Option<&regex::Regex>) -> bool {
        let name = offer.instance_type.as_str();
        let memory_gb = offer.memory_mib as f64 / 1024.0;
        let explicit = !self.instance_types.is_empty();
        if explicit && !self.instance_types.iter().any(|t| t == name) {
            return false;
        }
        if self.instance_types_to_avoid.iter().any(|t| t == name) {
            return false;
        }
        // Named types are taken as asked; the hardware filters choose among all the others.
        if !explicit {
            if offer.vcpus < self.cpu_min || self.cpu_max.is_some_and(|max| offer.vcpus > max) {
                return false;
            }
            if memory_gb < self.ram_min_gb || self.ram_max_gb.is_some_and(|max| memory_gb > max) {
                return false;
            }
            if family.is_some_and(|re| !re.is_match(name)) {
                return false;
            }
            if offer.burstable && !self.allow_burstable {
                return false;
            }
            if !offer.current_generation {
                return false;
            }
        }
        if self
            .cpu_arch
            .as_ref()
            .is_some_and(|arch| !offer.architectures.contains(arch))
        {
            return false;
        }
        if self.local_storage && offer.instance_storage_gb < self.storage_min_gb {
            return false;
        }
        !self.spot || offer.spot_supported
    }

    /// Price and zone of `offer` for this instance; `None` when it cannot run here (spot with no price in the
    /// asked zone).
    fn price(&self, offer: &Offer) -> Option<(Option<f64>, Option<String>)> {
        if !self.spot {
            return Some((offer.on_demand_price, self.zone.clone()));
        }
        match &self.zone {
            Some(zone) => offer
                .spot_prices
                .get(zone)
                .map(|p| (Some(*p), Some(zone.clone()))),
            None => offer
                .spot_prices
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1).then_with(|| a.0.cmp(b.0)))
                .map(|(zone, p)| (Some(*p), Some(zone.clone()))),
        }
    }
}

/// The types of `offers` that meet `req`, at most `max_price`, in the order the strategy gives; `demoted` types
/// (ones that lived under five minutes for this instance) go to the end, in the same order among themselves.
/// Types without a known price come after priced ones and never pass a `max_price`.
pub fn candidates(
    offers: &[Offer],
    req: &Requirements,
    demoted: &[String],
    rng: &mut impl rand::Rng,
) -> Vec<Candidate> {
    let family = req
        .instance_family
        .as_deref()
        .and_then(|f| regex::Regex::new(f).ok());
    let mut out: Vec<Candidate> = offers
        .iter()
        .filter(|o| req.fits(o, family.as_ref()))
        .filter_map(|o| {
            let (price, zone) = req.price(o)?;
            if let Some(cap) = req.max_price
                && price.is_none_or(|p| p > cap)
            {
                return None;
            }
            let arch = match &req.cpu_arch {
                Some(a) => a.clone(),
                None => o
                    .architectures
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "x86_64".into()),
            };
            Some(Candidate {
                instance_type: o.instance_type.clone(),
                price,
                zone,
                vcpus: o.vcpus,
                memory_gb: o.memory_mib as f64 / 1024.0,
                arch,
            })
        })
        .collect();
    let unit_price = |c: &Candidate| c.price.map(|p| p / (c.vcpus as f64 + c.memory_gb / 4.0));
    let by = |key: &dyn Fn(&Candidate) -> Option<f64>, a: &Candidate, b: &Candidate| {
        let known = |c: &Candidate| key(c).map_or(f64::INFINITY, |v| v);
        known(a)
            .total_cmp(&known(b))
            .then(
                a.price
                    .map_or(f64::INFINITY, |p| p)
                    .total_cmp(&b.price.map_or(f64::INFINITY, |p| p)),
            )
            .then(a.vcpus.cmp(&b.vcpus))
            .then(a.memory_gb.total_cmp(&b.memory_gb))
            .then(a.instance_type.cmp(&b.instance_type))
    };
    match req.strategy {
        Strategy::Cheapest => out.sort_by(|a, b| by(&|c| c.price, a, b)),
        Strategy::Balanced => out.sort_by(|a, b| by(&unit_price, a, b)),
        Strategy::Random => out.shuffle(rng),
    }
    // A stable partition: demoted types keep their relative order at the end.
    let (kept, late): (Vec<_>, Vec<_>) = out
        .into_iter()
        .partition(|c| !demoted.contains(&c.instance_type));
    kept.into_iter().chain(late).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::json;

    fn offer(
        name: &str,
        vcpus: u32,
        gb: u64,
        spot: &[(&str, f64)],
        on_demand: Option<f64>,
    ) -> Offer {
        let family = name.split('.').next().unwrap();
        Offer {
            instance_type: name.into(),
            vcpus,
            memory_mib: gb * 1024,
            architectures: vec![
                if family.contains('g') {
                    "arm64"
                } else {
                    "x86_64"
                }
                .into(),
            ],
            burstable: name.starts_with('t'),
            instance_storage_gb: if family.contains('d') { 118 } else { 0 },
            current_generation: true,
            spot_supported: true,
            spot_prices: spot.iter().map(|(z, p)| (z.to_string(), *p)).collect(),
            on_demand_price: on_demand,
        }
    }

    /// A fixed price table: (type, vCPUs, GB, spot per zone, on-demand).
    fn table() -> Vec<Offer> {
        vec![
            offer("m5.large", 2, 8, &[("a", 0.040), ("b", 0.035)], Some(0.096)),
            offer("c5.large", 2, 4, &[("a", 0.033), ("b", 0.038)], Some(0.085)),
            offer(
                "r5.large",
                2,
                16,
                &[("a", 0.045), ("b", 0.050)],
                Some(0.126),
            ),
            offer(
                "m5.xlarge",
                4,
                16,
                &[("a", 0.070), ("b", 0.072)],
                Some(0.192),
            ),
            offer(
                "m6g.large",
                2,
                8,
                &[("a", 0.031), ("b", 0.036)],
                Some(0.077),
            ),
            offer("t3.large", 2, 8, &[("a", 0.020)], Some(0.083)),
            offer("m5d.large", 2, 8, &[("a", 0.050)], None),
            offer("m5.metal", 96, 384, &[], Some(4.608)),
        ]
    }

    fn req(params: Value, spot: bool) -> Requirements {
        Requirements::from_parameters(&params, spot).unwrap()
    }

    fn names(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.instance_type.as_str()).collect()
    }

    fn pick(params: Value, spot: bool, demoted: &[&str]) -> Vec<Candidate> {
        let demoted: Vec<String> = demoted.iter().map(|s| s.to_string()).collect();
        candidates(
            &table(),
            &req(params, spot),
            &demoted,
            &mut rand::rngs::StdRng::seed_from_u64(7),
        )
    }

    #[test]
    fn cheapest_orders_by_price_in_the_cheapest_zone() {
        let c = pick(
            json!({"selection_strategy": "cheapest", "cpu_max": 4}),
            true,
            &[],
        );
        assert_eq!(
            names(&c),
            [
                "m6g.large",
                "c5.large",
                "m5.large",
                "r5.large",
                "m5d.large",
                "m5.xlarge"
            ]
        );
        assert_eq!(c[2].zone.as_deref(), Some("b"));
        assert_eq!(c[2].price, Some(0.035));
        // A zone fixes the price column; types without a price there drop out.
        let c = pick(
            json!({"selection_strategy": "cheapest", "zone": "b", "cpu_max": 4}),
            true,
            &[],
        );
        assert_eq!(
            names(&c),
            ["m5.large", "m6g.large", "c5.large", "r5.large", "m5.xlarge"]
        );
    }

    #[test]
    fn balanced_prefers_more_machine_per_dollar() {
        // Per unit (vCPU + GB/4): r5.large 0.045/6, m6g.large 0.031/4, m5.large 0.035/4 = m5.xlarge 0.070/8
        // (the cheaper first), c5.large 0.033/3, m5d.large 0.050/4.
        let c = pick(json!({"cpu_max": 4}), true, &[]);
        assert_eq!(
            names(&c),
            [
                "r5.large",
                "m6g.large",
                "m5.large",
                "m5.xlarge",
                "c5.large",
                "m5d.large"
            ]
        );
    }

    #[test]
    fn on_demand_uses_the_price_list_and_unknown_prices_go_last() {
        let c = pick(
            json!({"selection_strategy": "cheapest", "cpu_max": 4}),
            false,
            &[],
        );
        assert_eq!(
            names(&c),
            [
                "m6g.large",
                "c5.large",
                "m5.large",
                "r5.large",
                "m5.xlarge",
                "m5d.large"
            ]
        );
        assert_eq!(c.last().unwrap().price, None);
    }

    #[test]
    fn max_price_caps_and_filters_narrow() {
        let c = pick(
            json!({"selection_strategy": "cheapest", "max_price": 0.09}),
            false,
            &[],
        );
        assert_eq!(
            names(&c),
            ["m6g.large", "c5.large"],
            "unknown prices never pass a cap"
        );
        let c = pick(json!({"ram_min": 16, "cpu_arch": "x86_64"}), true, &[]);
        assert_eq!(
            names(&c),
            ["r5.large", "m5.xlarge"],
            "m5.metal has no spot price"
        );
        let c = pick(
            json!({"allow_burstable": true, "selection_strategy": "cheapest", "cpu_max": 2}),
            true,
            &[],
        );
        assert_eq!(c[0].instance_type, "t3.large");
        let c = pick(
            json!({"instance_family": "^m5", "instance_types_to_avoid": ["m5d.large"], "cpu_max": 4}),
            true,
            &[],
        );
        assert_eq!(names(&c), ["m5.large", "m5.xlarge"]);
        let c = pick(
            json!({"storage_type": "local", "storage_min": 100}),
            true,
            &[],
        );
        assert_eq!(names(&c), ["m5d.large"]);
        // Named types are taken as asked, even a burstable one.
        let c = pick(
            json!({"instance_types": ["t3.large", "c5.large"], "selection_strategy": "cheapest"}),
            true,
            &[],
        );
        assert_eq!(names(&c), ["t3.large", "c5.large"]);
    }

    #[test]
    fn random_is_a_permutation_and_demoted_types_go_last() {
        let all = pick(
            json!({"selection_strategy": "cheapest", "cpu_max": 4}),
            true,
            &[],
        );
        let shuffled = pick(
            json!({"selection_strategy": "random", "cpu_max": 4}),
            true,
            &[],
        );
        let mut a = names(&all);
        let mut b = names(&shuffled);
        assert_ne!(a, b, "seed 7 does not give the sorted order");
        a.sort();
        b.sort();
        assert_eq!(a, b);
        let c = pick(
            json!({"selection_strategy": "cheapest", "cpu_max": 4}),
            true,
            &["m6g.large", "c5.large"],
        );
        assert_eq!(
            names(&c),
            [
                "m5.large",
                "r5.large",
                "m5d.large",
                "m5.xlarge",
                "m6g.large",
                "c5.large"
            ]
        );
    }

    #[test]
    fn contradictions_are_refused() {
        assert!(Requirements::from_parameters(&json!({"cpu_min": 8, "cpu_max": 2}), true).is_err());
        assert!(Requirements::from_parameters(&json!({"ram_min": 8, "ram_max": 2}), true).is_err());
        assert!(Requirements::from_parameters(&json!({"instance_family": "("}), true).is_err());
    }
}
