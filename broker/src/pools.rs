//! Warm pools (docs/pools.md): how many items each plan keeps made ahead of time, and which provisions an item
//! can serve. The API and the workers read both from here, so they agree on what a pool holds.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{
    catalog::{Catalog, Engine},
    config::Settings,
};

/// The embedded default's pools: two `dedicated` servers (a warm one answers in milliseconds instead of the
/// 0.8 s of initdb + start) and, when the `ha` plan runs on this machine (`HA_ENGINE=local`), one `ha` cluster
/// (instead of Patroni's bootstrap, 8-15 s). The `ha` plan is published there only where etcd and Patroni are
/// installed; elsewhere its target is left out like any plan that is not published. With `HA_ENGINE=ec2` an
/// `ha` item is three running VMs: that pool is the operator's to ask for.
pub fn embedded_default_targets(ha_engine: &str) -> String {
    if ha_engine == "local" {
        "dedicated=2,ha=1".to_string()
    } else {
        "dedicated=2".to_string()
    }
}

/// Engines whose items a pool can hold (their finishing step renames and re-keys an item). An `ec2` item is a
/// running VM, an `ha_ec2` item three, that cost money while they wait: their pools exist only when the operator
/// sets a target (never in a default one).
const POOLED_ENGINES: &[Engine] = &[
    Engine::Shared,
    Engine::Local,
    Engine::HaLocal,
    Engine::S3,
    Engine::Ec2,
    Engine::HaEc2,
];

/// Engines whose pools can also hold clones of a preset version (the fill clones the version's template).
const PRESET_POOLED_ENGINES: &[Engine] = &[Engine::Shared, Engine::Local];

/// A preset whose clones a pool keeps: a name in the default namespace and a version (`None`: the newest ready
/// one, so the pool follows each new version).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PresetPin {
    pub name: String,
    pub version: Option<i32>,
}

impl PresetPin {
    /// `name` or `name@version`, as written in `POOL_TARGETS`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, version) = match text.split_once('@') {
            Some((name, version)) => {
                let number = version
                    .parse::<i32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        format!("the version of preset `{name}` must be a positive whole number, not `{version}`")
                    })?;
                (name, Some(number))
            }
            None => (text, None),
        };
        crate::snapshots::check_preset_name(name)?;
        Ok(Self {
            name: name.to_string(),
            version,
        })
    }

    /// The form `parse` reads, also kept in `pool_items.preset_target`.
    pub fn label(&self) -> String {
        match self.version {
            Some(v) => format!("{}@{v}", self.name),
            None => self.name.clone(),
        }
    }
}

/// What a pool holds: items of a plan made with its defaults, or clones of a preset version for it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolKey {
    pub plan_id: String,
    pub preset: Option<PresetPin>,
}

/// Items to keep ready, by pool (pools with a target above zero only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolTargets {
    by_key: BTreeMap<PoolKey, u32>,
}

impl PoolTargets {
    /// `POOL_TARGETS` read against the catalog: every plan named must exist and have an engine pools serve.
    /// Plans of the catalog that are not published (engine not configured) are left out without an error.
    /// Presets are only checked for their syntax: they are made at run time, and a pool of a preset that does
    /// not exist (yet) stays empty.
    pub fn from_settings(settings: &Settings, catalog: &Catalog) -> anyhow::Result<Self> {
        Self::parse(settings.pool_targets.as_deref().unwrap_or(""), catalog)
    }

    pub fn parse(text: &str, catalog: &Catalog) -> anyhow::Result<Self> {
        let mut by_key = BTreeMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (pool, count) = pair.split_once('=').ok_or_else(|| {
                anyhow::anyhow!(
                    "POOL_TARGETS: `{pair}` is not `plan=count` or `plan/preset[@version]=count`"
                )
            })?;
            let (pool, count) = (pool.trim(), count.trim());
            let count: u32 = count.parse().map_err(|_| {
                anyhow::anyhow!(
                    "POOL_TARGETS: the count of `{pool}` must be a whole number, not `{count}`"
                )
            })?;
            let (plan, preset) = match pool.split_once('/') {
                Some((plan, preset)) => (
                    plan.trim(),
                    Some(
                        PresetPin::parse(preset.trim())
                            .map_err(|e| anyhow::anyhow!("POOL_TARGETS: `{pool}`: {e}"))?,
                    ),
                ),
                None => (pool, None),
            };
            let found: Vec<_> = catalog
                .services()
                .iter()
                .flat_map(|s| &s.plans)
                .filter(|p| p.id == plan || p.name == plan)
                .collect();
            if found.is_empty() {
                // A plan whose engine is not configured here is not in the catalog: no pool for it.
                continue;
            }
            for p in found {
                if !POOLED_ENGINES.contains(&p.engine) {
                    anyhow::bail!(
                        "POOL_TARGETS: plan `{}` (engine {}) has no pool; pools serve the engines {}",
                        p.name,
                        p.engine.as_str(),
                        POOLED_ENGINES
                            .iter()
                            .map(|e| e.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                if preset.is_some() && !PRESET_POOLED_ENGINES.contains(&p.engine) {
                    anyhow::bail!(
                        "POOL_TARGETS: `{pool}`: pools of preset clones serve the plans of the engines {}, not `{}` \
                         (engine {})",
                        PRESET_POOLED_ENGINES
                            .iter()
                            .map(|e| e.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        p.name,
                        p.engine.as_str()
                    );
                }
                let key = PoolKey {
                    plan_id: p.id.clone(),
                    preset: preset.clone(),
                };
                if count > 0 {
                    by_key.insert(key, count);
                } else {
                    by_key.remove(&key);
                }
            }
        }
        Ok(Self { by_key })
    }

    /// The target of `plan_id`'s pool of items made with its defaults (0: no pool).
    pub fn target(&self, plan_id: &str) -> u32 {
        self.target_of(plan_id, None)
    }

    /// The target of the pool of `plan_id` holding `preset`'s clones (`None`: the plan's defaults).
    pub fn target_of(&self, plan_id: &str, preset: Option<&PresetPin>) -> u32 {
        self.by_key
            .iter()
            .find(|(k, _)| k.plan_id == plan_id && k.preset.as_ref() == preset)
            .map_or(0, |(_, n)| *n)
    }

    /// Whether `plan_id` has any pool (of its defaults or of a preset).
    pub fn has_pool(&self, plan_id: &str) -> bool {
        self.by_key.keys().any(|k| k.plan_id == plan_id)
    }

    /// Whether `plan_id` has a pool of preset clones.
    pub fn has_preset_pool(&self, plan_id: &str) -> bool {
        self.by_key
            .keys()
            .any(|k| k.plan_id == plan_id && k.preset.is_some())
    }

    /// Every pool with its target.
    pub fn iter(&self) -> impl Iterator<Item = (&PoolKey, u32)> {
        self.by_key.iter().map(|(k, v)| (k, *v))
    }
}

/// Whether an item made with the plan's defaults can become an instance asked for with `parameters` (the
/// webhook already taken out): only parameters the finishing step applies cheaply. Anything else (a preset,
/// another Postgres version, a tuning profile) takes the ordinary path.
pub fn can_serve(engine: Engine, parameters: &Value) -> bool {
    let allowed: &[&str] = match engine {
        // Extensions are created by the finishing step; `backups` only schedules.
        Engine::Shared => &["extensions", "backups"],
        // Names are renamed and the admin password set by the finishing step; tags mean nothing locally.
        Engine::Local | Engine::HaLocal => {
            &["extensions", "backups", "app_db_name", "admin_user", "tags"]
        }
        // The same on a VM (the finishing step re-tags its resources with `tags`); anything that shapes the
        // VM (its type's requirements, region or zone, addresses, ssh keys, the Postgres version, the tuning
        // profile) needs a VM of its own.
        Engine::Ec2 => &["extensions", "backups", "app_db_name", "admin_user", "tags"],
        // A cluster on VMs: the same; its members' shape (number, hardware, zones, spot, addresses, version)
        // needs VMs of its own.
        Engine::HaEc2 => &["extensions", "backups", "app_db_name", "admin_user", "tags"],
        // The finishing step sets the bucket's tags, public access, CORS and lifecycle (one call each); a
        // bucket cannot move to another region.
        Engine::S3 => &["tags", "public_read", "cors", "lifecycle"],
    };
    // A cluster's own parameters are served when they ask what a pooled cluster is made with: its member
    // count and asynchronous replication (changing either means new members or a wait for a standby).
    let default_of = |key: &str| -> Option<Value> {
        match (engine, key) {
            (Engine::HaLocal | Engine::HaEc2, "members") => Some(Value::from(HA_DEFAULT_MEMBERS)),
            (Engine::HaLocal | Engine::HaEc2, "synchronous") => Some(Value::Bool(false)),
            // What a pooled cluster's VMs are made with: on demand, private addresses only.
            (Engine::HaEc2, "spot" | "public_ip") => Some(Value::Bool(false)),
            // What a pooled VM is made with: a private address only.
            (Engine::Ec2, "public_ip" | "static_ip") => Some(Value::Bool(false)),
            _ => None,
        }
    };
    match parameters {
        Value::Object(map) => map.iter().all(|(k, v)| {
            v.is_null() || allowed.contains(&k.as_str()) || default_of(k).as_ref() == Some(v)
        }),
        Value::Null => true,
        _ => false,
    }
}

/// Whether a clone of a preset version, made for the plan, can become an instance asked for with `parameters`:
/// the `preset` parameter is matched by the claim (the version it names or the newest), the rest must be what
/// `can_serve` allows.
pub fn can_serve_preset(engine: Engine, parameters: &Value) -> bool {
    let Value::Object(map) = parameters else {
        return false;
    };
    let mut rest = map.clone();
    rest.remove("preset");
    can_serve(engine, &Value::Object(rest))
}
/// The member count of an `ha` cluster made with no parameters (what a pooled one has).
pub const HA_DEFAULT_MEMBERS: u64 = 3;

/// The id of a new pool item: never an OSB id in practice, and its names (derived from it) are berth's own.
pub fn new_item_id() -> String {
    format!("pool-{}", uuid::Uuid::new_v4())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn serves_only_cheap_parameters() {
        assert!(can_serve(Engine::Shared, &json!({})));
        assert!(can_serve(
            Engine::Shared,
            &json!({"extensions": ["pg_trgm"]})
        ));
        assert!(!can_serve(Engine::Shared, &json!({"preset": "p"})));
        assert!(can_serve(
            Engine::Local,
            &json!({"app_db_name": "app", "admin_user": "me"})
        ));
        assert!(!can_serve(
            Engine::Local,
            &json!({"postgres_version": "16"})
        ));
        assert!(!can_serve(
            Engine::Local,
            &json!({"tuning_profile": "oltp"})
        ));
        assert!(can_serve_preset(
            Engine::Shared,
            &json!({"preset": "p", "extensions": ["pg_trgm"]})
        ));
        assert!(!can_serve_preset(
            Engine::Shared,
            &json!({"preset": "p", "restore_from": {}})
        ));
        assert!(!can_serve_preset(
            Engine::Local,
            &json!({"preset": "p", "tuning_profile": "oltp"})
        ));
    }

    #[test]
    fn preset_pins_read_a_name_and_an_optional_version() {
        let pin = PresetPin::parse("orders-demo").unwrap();
        assert_eq!((pin.name.as_str(), pin.version), ("orders-demo", None));
        assert_eq!(pin.label(), "orders-demo");
        let pin = PresetPin::parse("orders-demo@3").unwrap();
        assert_eq!(pin.version, Some(3));
        assert_eq!(pin.label(), "orders-demo@3");
        assert!(
            PresetPin::parse("orders@0")
                .unwrap_err()
                .contains("positive")
        );
        assert!(PresetPin::parse("orders@x").is_err());
        assert!(PresetPin::parse("../etc").is_err());
        assert!(PresetPin::parse("").is_err());
        assert!(can_serve(Engine::S3, &json!({})));
        assert!(can_serve(
            Engine::S3,
            &json!({"tags": {"team": "a"}, "public_read": false})
        ));
        assert!(!can_serve(Engine::S3, &json!({"region": "eu-west-1"})));
        assert!(can_serve(
            Engine::HaLocal,
            &json!({"members": 3, "synchronous": false, "admin_user": "me"})
        ));
        assert!(!can_serve(Engine::HaLocal, &json!({"members": 5})));
        assert!(!can_serve(Engine::HaLocal, &json!({"synchronous": true})));
        assert!(!can_serve(
            Engine::HaLocal,
            &json!({"postgres_version": "16"})
        ));
    }

    #[test]
    fn ec2_items_serve_names_extensions_and_tags_only() {
        assert!(can_serve(Engine::Ec2, &json!({})));
        assert!(can_serve(Engine::Ec2, &Value::Null));
        assert!(can_serve(
            Engine::Ec2,
            &json!({"app_db_name": "shop", "admin_user": "boss", "extensions": ["pgcrypto"],
                    "tags": {"team": "a"}, "backups": null, "public_ip": false, "static_ip": false})
        ));
        for other in [
            json!({"cpu_min": 4}),
            json!({"ram_min": 16}),
            json!({"instance_types": ["m7g.large"]}),
            json!({"region": "eu-west-1"}),
            json!({"zone": "us-east-1b"}),
            json!({"public_ip": true}),
            json!({"static_ip": true}),
            json!({"ssh_keys": ["ssh-ed25519 AAAA me"]}),
            json!({"postgres_version": "16"}),
            json!({"tuning_profile": "oltp"}),
            json!({"max_price": 0.1}),
            json!({"preset": "p"}),
            json!({"restore_from": {}}),
        ] {
            assert!(!can_serve(Engine::Ec2, &other), "{other}");
        }
    }

    /// The `ec2` plans get a pool only from an operator's target, and never one of preset clones.
    #[test]
    fn ec2_plans_are_pooled_when_the_operator_asks() {
        let catalog_with = |dedicated_engine: &str| {
            let plans_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
            let settings: Settings = serde_json::from_value(json!({
                "plans_dir": plans_dir,
                "aws_region": "us-east-1",
                "aws_access_key_id": "k",
                "dedicated_engine": dedicated_engine,
                "ha_engine": "local",
                "local_engine": true,
            }))
            .unwrap();
            settings.check().unwrap();
            Catalog::load_for(&settings).unwrap()
        };
        let on_ec2 = catalog_with("ec2");
        let targets = PoolTargets::parse("dedicated-spot=1,dedicated=2", &on_ec2).unwrap();
        assert_eq!(
            targets.target(&catalog_plan_id(&on_ec2, "dedicated-spot")),
            1
        );
        assert_eq!(targets.target(&catalog_plan_id(&on_ec2, "dedicated")), 2);
        let engine_of = |catalog: &Catalog, key: &PoolKey| {
            catalog.plan_by_id(&key.plan_id).map(|p| p.plan.engine)
        };
        assert!(
            targets
                .iter()
                .all(|(key, _)| engine_of(&on_ec2, key) == Some(Engine::Ec2))
        );
        let err = PoolTargets::parse("dedicated-spot/orders=1", &on_ec2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("preset clones") && err.contains("`dedicated-spot`"),
            "{err}"
        );
        assert!(
            PoolTargets::parse("dedicated-spot=0", &on_ec2)
                .unwrap()
                .iter()
                .next()
                .is_none()
        );
        // The embedded default (set only with DEDICATED_ENGINE=local) names no ec2 plan, even with AWS.
        let local = catalog_with("local");
        for ha_engine in ["local", "ec2"] {
            let default = PoolTargets::parse(&embedded_default_targets(ha_engine), &local).unwrap();
            assert!(
                default
                    .iter()
                    .all(|(key, _)| engine_of(&local, key) != Some(Engine::Ec2)),
                "{default:?}"
            );
        }
    }

    #[test]
    fn ha_ec2_items_serve_names_extensions_tags_and_the_defaults_only() {
        assert!(can_serve(Engine::HaEc2, &json!({})));
        assert!(can_serve(
            Engine::HaEc2,
            &json!({"app_db_name": "shop", "admin_user": "boss", "extensions": ["pgcrypto"],
                    "tags": {"team": "a"}, "backups": null, "members": 3, "synchronous": false,
                    "spot": false, "public_ip": false})
        ));
        for other in [
            json!({"members": 5}),
            json!({"synchronous": true}),
            json!({"spot": true}),
            json!({"public_ip": true}),
            json!({"zones": ["us-east-1a"]}),
            json!({"cpu_min": 4}),
            json!({"region": "eu-west-1"}),
            json!({"ssh_keys": ["ssh-ed25519 AAAA me"]}),
            json!({"postgres_version": "16"}),
            json!({"tuning_profile": "oltp"}),
            json!({"preset": "p"}),
        ] {
            assert!(!can_serve(Engine::HaEc2, &other), "{other}");
        }
    }

    /// With `HA_ENGINE=ec2` the `ha` plan is pooled when the operator names it, never by the embedded default.
    #[test]
    fn an_ec2_ha_plan_is_pooled_only_when_named() {
        let plans_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
        let settings: Settings = serde_json::from_value(json!({
            "plans_dir": plans_dir,
            "aws_region": "us-east-1",
            "aws_access_key_id": "k",
            "ha_engine": "ec2",
            "local_engine": true,
        }))
        .unwrap();
        settings.check().unwrap();
        let catalog = Catalog::load_for(&settings).unwrap();
        let ha = catalog_plan_id(&catalog, "ha");
        assert_eq!(catalog.plan_by_id(&ha).unwrap().plan.engine, Engine::HaEc2);
        assert_eq!(PoolTargets::parse("ha=1", &catalog).unwrap().target(&ha), 1);
        let err = PoolTargets::parse("ha/orders=1", &catalog)
            .unwrap_err()
            .to_string();
        assert!(err.contains("preset clones"), "{err}");
        // The embedded default asks for no ha pool there.
        let default = PoolTargets::parse(&embedded_default_targets("ec2"), &catalog).unwrap();
        assert_eq!(default.target(&ha), 0);
        assert!(!default.has_pool(&ha));
        assert!(embedded_default_targets("local").contains("ha=1"));
        assert_eq!(
            PoolTargets::parse("dedicated=1", &catalog)
                .unwrap()
                .target(&catalog_plan_id(&catalog, "dedicated")),
            1
        );
    }

    #[test]
    fn preset_clones_are_pooled_for_postgres_plans_with_templates_only() {
        let plans_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
        let settings: Settings = serde_json::from_value(json!({
            "plans_dir": plans_dir,
            "ha_engine": "local",
            "local_engine": true,
        }))
        .unwrap();
        settings.check().unwrap();
        let catalog = Catalog::load_for(&settings).unwrap();
        let err = PoolTargets::parse("ha/orders=1", &catalog)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("preset clones") && err.contains("`ha`"),
            "{err}"
        );
        let targets = PoolTargets::parse("dedicated/orders=1,ha=1", &catalog).unwrap();
        assert!(targets.has_preset_pool(&catalog_plan_id(&catalog, "dedicated")));
        assert_eq!(targets.target(&catalog_plan_id(&catalog, "ha")), 1);
    }

    fn catalog_plan_id(catalog: &Catalog, name: &str) -> String {
        catalog
            .services()
            .iter()
            .flat_map(|s| &s.plans)
            .find(|p| p.name == name)
            .map(|p| p.id.clone())
            .unwrap()
    }
}
