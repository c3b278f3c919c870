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
/// `ha` pool would stop start-up, so it is not asked for.
pub fn embedded_default_targets(ha_engine: &str) -> String {
    if ha_engine == "local" {
        "dedicated=2,ha=1".to_string()
    } else {
        "dedicated=2".to_string()
    }
}

/// Engines whose items a pool can hold (their finishing step renames and re-keys an item).
const POOLED_ENGINES: &[Engine] = &[Engine::Shared, Engine::Local, Engine::HaLocal, Engine::S3];

/// Items to keep ready, by plan id (plans with a target above zero only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolTargets {
    by_plan: BTreeMap<String, u32>,
}

impl PoolTargets {
    /// `POOL_TARGETS` read against the catalog: every plan named must exist and have an engine pools serve.
    /// Plans of the catalog that are not published (engine not configured) are left out without an error.
    pub fn from_settings(settings: &Settings, catalog: &Catalog) -> anyhow::Result<Self> {
        Self::parse(settings.pool_targets.as_deref().unwrap_or(""), catalog)
    }

    pub fn parse(text: &str, catalog: &Catalog) -> anyhow::Result<Self> {
        let mut by_plan = BTreeMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (plan, count) = pair
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("POOL_TARGETS: `{pair}` is not `plan=count`"))?;
            let (plan, count) = (plan.trim(), count.trim());
            let count: u32 = count.parse().map_err(|_| {
                anyhow::anyhow!(
                    "POOL_TARGETS: the count of `{plan}` must be a whole number, not `{count}`"
                )
            })?;
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
                if p.engine == Engine::HaEc2 {
                    anyhow::bail!(
                        "POOL_TARGETS: plan `{}` runs on EC2 here (HA_ENGINE=ec2), and EC2 clusters have no pool; \
                         remove it from POOL_TARGETS, or set HA_ENGINE=local for pools of local clusters",
                        p.name
                    );
                }
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
                if count > 0 {
                    by_plan.insert(p.id.clone(), count);
                } else {
                    by_plan.remove(&p.id);
                }
            }
        }
        Ok(Self { by_plan })
    }

    /// The target of `plan_id` (0: no pool).
    pub fn target(&self, plan_id: &str) -> u32 {
        self.by_plan.get(plan_id).copied().unwrap_or(0)
    }

    /// (plan id, target) of every plan with a pool.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.by_plan.iter().map(|(k, v)| (k.as_str(), *v))
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
        // The finishing step sets the bucket's tags, public access, CORS and lifecycle (one call each); a
        // bucket cannot move to another region.
        Engine::S3 => &["tags", "public_read", "cors", "lifecycle"],
        _ => return false,
    };
    // A cluster's own parameters are served when they ask what a pooled cluster is made with: its member
    // count and asynchronous replication (changing either means new members or a wait for a standby).
    let default_of = |key: &str| -> Option<Value> {
        match (engine, key) {
            (Engine::HaLocal, "members") => Some(Value::from(HA_DEFAULT_MEMBERS)),
            (Engine::HaLocal, "synchronous") => Some(Value::Bool(false)),
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
        assert!(!can_serve(Engine::HaEc2, &json!({})));
    }

    #[test]
    fn an_ec2_ha_plan_has_no_pool() {
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
        let err = PoolTargets::parse("ha=1", &catalog)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HA_ENGINE=ec2") && err.contains("`ha`"),
            "{err}"
        );
        // The embedded default asks for no ha pool there, so it starts.
        assert!(PoolTargets::parse(&embedded_default_targets("ec2"), &catalog).is_ok());
        assert!(embedded_default_targets("local").contains("ha=1"));
        assert_eq!(
            PoolTargets::parse("dedicated=1", &catalog)
                .unwrap()
                .target(&catalog_plan_id(&catalog, "dedicated")),
            1
        );
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
