//! The catalog: one JSON file per service in `plans/`. Loaded and checked once at start; a bad file stops
//! start-up with a message naming the file and the field.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

text_enum! {
    /// Engines berth knows. A plan names one; the plan is published only where its engine is configured. A
    /// catalog file naming another fails to load, naming the file and the field.
    pub enum Engine ("engine") {
        S3 = "s3",
        Shared = "shared",
        Local = "local",
        Ec2 = "ec2",
        HaLocal = "ha_local",
        HaEc2 = "ha_ec2",
    }
}

/// Every engine berth knows.
pub const KNOWN_ENGINES: &[Engine] = Engine::ALL;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    pub bindable: bool,
    #[serde(default)]
    pub instances_retrievable: bool,
    #[serde(default)]
    pub bindings_retrievable: bool,
    #[serde(default)]
    pub allow_context_updates: bool,
    #[serde(default)]
    pub plan_updateable: bool,
    /// OSB's free-form service metadata (display name, documentation URL, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub metadata: Option<Value>,
    /// OSB's dashboard client, as the catalog file gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub dashboard_client: Option<Value>,
    /// berth's own, never published: features (of those plans list in `features`) that cannot be turned off
    /// once on, each with the reason a person is told when a plan change would drop it.
    #[serde(default, skip_serializing)]
    pub one_way_features: std::collections::BTreeMap<String, String>,
    pub plans: Vec<Plan>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub description: String,
    /// Which engine carries the plan out. berth's own field: never published.
    #[serde(skip_serializing)]
    pub engine: Engine,
    /// berth's own, never published: other engines the operator may choose for this plan (`DEDICATED_ENGINE`).
    #[serde(default, skip_serializing)]
    pub alternative_engines: Vec<Engine>,
    /// berth's own, never published: what the engine turns on for this plan (`versioning`, `encryption`).
    #[serde(default, skip_serializing)]
    pub features: Vec<String>,
    /// berth's own, never published: provision, update and deprovision finish quickly enough to be answered
    /// synchronously to a client that does not send `accepts_incomplete=true` (others get 422 `AsyncRequired`).
    #[serde(default, skip_serializing)]
    pub synchronous: bool,
    /// OSB's free-form plan metadata, with what start-up adds for the plan's engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub metadata: Option<Value>,
    #[serde(default = "yes")]
    pub free: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bindable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_rotatable: Option<bool>,
    /// berth's own, never published as such: the bounds of the `expires_in` bind parameter, which the catalog
    /// publishes in the plan's bind schema. Absent: bindings of this plan cannot be asked to expire.
    #[serde(default, skip_serializing)]
    pub binding_expiry: Option<BindingExpiry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_updateable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_polling_duration: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_info: Option<MaintenanceInfo>,
    #[serde(default)]
    pub schemas: Schemas,
}

fn yes() -> bool {
    true
}

/// The bind parameter a client asks for an expiring binding with: seconds from the bind request.
pub const EXPIRES_IN: &str = "expires_in";

/// How long an expiring binding of a plan may live, and how many unexpired ones an instance may have.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BindingExpiry {
    pub min_seconds: u32,
    pub max_seconds: u32,
    pub max_per_instance: u32,
}

impl BindingExpiry {
    /// The `expires_in` property of the bind schema.
    fn schema(&self) -> Value {
        serde_json::json!({
            "description": format!(
                "Seconds until the binding expires: its credentials are revoked then, and the bind response and \
                 GET binding carry metadata.expires_at and renew_before. At most {} unexpired expiring bindings \
                 per instance. Absent: the binding never expires.",
                self.max_per_instance
            ),
            "type": "integer",
            "minimum": self.min_seconds,
            "maximum": self.max_seconds,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceInfo {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Schemas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_instance: Option<InstanceSchemas>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_binding: Option<BindingSchemas>,
}

impl Schemas {
    /// Each parameter schema a plan may have, with what it checks and its place in the file.
    fn each(&self) -> [(SchemaFor, &'static str, Option<&InputSchema>); 3] {
        let instance = self.service_instance.as_ref();
        [
            (
                SchemaFor::Provision,
                "service_instance.create",
                instance.and_then(|s| s.create.as_ref()),
            ),
            (
                SchemaFor::Update,
                "service_instance.update",
                instance.and_then(|s| s.update.as_ref()),
            ),
            (
                SchemaFor::Bind,
                "service_binding.create",
                self.service_binding
                    .as_ref()
                    .and_then(|s| s.create.as_ref()),
            ),
        ]
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSchemas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<InputSchema>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<InputSchema>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BindingSchemas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<InputSchema>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputSchema {
    /// A JSON schema the request's `parameters` are checked against.
    #[schema(value_type = Object)]
    pub parameters: Value,
}

/// Which request a parameter set belongs to; each may have its own schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchemaFor {
    Provision,
    Update,
    Bind,
}

/// A plan together with its service, as handlers need them.
#[derive(Debug, Clone)]
pub struct PlanRef<'a> {
    pub service: &'a Service,
    pub plan: &'a Plan,
}

impl PlanRef<'_> {
    /// Plans of the `postgres` service have a database: presets and backups apply to them.
    pub fn has_database(&self) -> bool {
        self.service.name == "postgres"
    }

    pub fn bindable(&self) -> bool {
        self.plan.bindable.unwrap_or(self.service.bindable)
    }
    pub fn plan_updateable(&self) -> bool {
        self.plan
            .plan_updateable
            .unwrap_or(self.service.plan_updateable)
    }
    /// Whether the instance's bindings can be given new credentials (the Akkeris `credentials` action): only
    /// where each binding has credentials of its own, which the plan's metadata says (`"credentials":
    /// "per-binding"`, set at start-up from settings; see [`engine_metadata`]).
    pub fn can_rotate_credentials(&self) -> bool {
        self.plan
            .metadata
            .as_ref()
            .and_then(|m| m.get("credentials"))
            .and_then(Value::as_str)
            == Some("per-binding")
    }
    /// Whether a client that does not accept asynchronous answers may provision, update or deprovision it.
    pub fn synchronous(&self) -> bool {
        self.plan.synchronous
    }
    pub fn has_feature(&self, feature: &str) -> bool {
        self.plan.features.iter().any(|f| f == feature)
    }
    /// Why moving from this plan to `target` is impossible: a one-way feature this plan has and `target`
    /// lacks. `None` when the change can be made.
    pub fn cannot_change_to(&self, target: &Plan) -> Option<String> {
        self.plan
            .features
            .iter()
            .filter(|f| !target.features.contains(f))
            .find_map(|f| self.service.one_way_features.get(f))
            .map(|why| {
                format!(
                    "plan {:?} cannot change to plan {:?}: {why}",
                    self.plan.name, target.name
                )
            })
    }
}

/// The `GET /v2/catalog` body.
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogBody<'a> {
    pub services: &'a [Service],
}

/// The loaded catalog: services with only the plans whose engines are available, compiled parameter
/// schemas, and the `/v2/catalog` body rendered once.
pub struct Catalog {
    services: Vec<Service>,
    validators: HashMap<(String, SchemaFor), jsonschema::Validator>,
    rendered: Arc<[u8]>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("services", &self.services.len())
            .finish()
    }
}

/// A parameter set that does not match its plan's schema.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ParameterError(pub String);

impl Catalog {
    /// Loads every `*.json` in `dir`, keeping plans whose engine is in `available_engines`.
    pub fn load(dir: &Path, available_engines: &[Engine]) -> anyhow::Result<Self> {
        Self::from_services(read_services(dir)?, available_engines)
    }

    pub fn from_services(all: Vec<Service>, available_engines: &[Engine]) -> anyhow::Result<Self> {
        Self::build(all, available_engines)
    }
}

/// Every `*.json` service file in `dir`, parsed and checked.
fn read_services(dir: &Path) -> anyhow::Result<Vec<Service>> {
    {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading the catalog folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        if files.is_empty() {
            anyhow::bail!(
                "the catalog folder {} has no *.json service files",
                dir.display()
            );
        }
        let mut services = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading catalog file {}", file.display()))?;
            services.push(parse_service(file, &text)?);
        }
        Ok(services)
    }
}

/// Moves the named plans to the engine the operator chose for them; the plan must list it as an alternative.
fn choose_engines(services: &mut [Service], choices: &[(&str, String)]) -> anyhow::Result<()> {
    for (name, engine) in choices {
        for plan in services
            .iter_mut()
            .flat_map(|s| s.plans.iter_mut())
            .filter(|p| p.name == *name)
        {
            if plan.engine == engine.as_str() {
                continue;
            }
            let alternative = plan
                .alternative_engines
                .iter()
                .find(|e| **e == engine.as_str());
            let Some(&chosen) = alternative else {
                anyhow::bail!(
                    "plan {name:?} cannot run on engine {engine:?} (its engines: {}{})",
                    plan.engine,
                    plan.alternative_engines
                        .iter()
                        .map(|e| format!(", {e}"))
                        .collect::<String>()
                );
            };
            plan.engine = chosen;
        }
    }
    Ok(())
}

impl Catalog {
    fn build(all: Vec<Service>, available_engines: &[Engine]) -> anyhow::Result<Self> {
        check_unique(&all)?;
        let mut validators = HashMap::new();
        let mut services = Vec::new();
        for mut service in all {
            service
                .plans
                .retain(|p| available_engines.contains(&p.engine));
            if service.plans.is_empty() {
                continue;
            }
            for plan in &mut service.plans {
                publish_binding_expiry(plan)?;
            }
            for plan in &service.plans {
                for (which, _, schema) in plan.schemas.each() {
                    if let Some(schema) = schema {
                        let validator = jsonschema::validator_for(&schema.parameters).map_err(|e| {
                            anyhow::anyhow!(
                                "service {:?} plan {:?}: invalid {which:?} parameter schema: {e}",
                                service.name,
                                plan.name
                            )
                        })?;
                        validators.insert((plan.id.clone(), which), validator);
                    }
                }
            }
            services.push(service);
        }
        let rendered = serde_json::to_vec(&CatalogBody {
            services: &services,
        })?
        .into();
        Ok(Self {
            services,
            validators,
            rendered,
        })
    }

    /// Adds what start-up knows about an engine to the `metadata` of each of its plans, then renders the
    /// catalog again: every key of `fields` is set (replacing the file's value), and `bullets` are appended
    /// to `metadata.bullets`. Used for facts that depend on settings (whether an S3 store gives each binding
    /// its own key), which no catalog file can know.
    pub fn with_engine_metadata(
        mut self,
        engine: Engine,
        fields: &serde_json::Map<String, Value>,
        bullets: &[&str],
    ) -> anyhow::Result<Self> {
        for plan in self
            .services
            .iter_mut()
            .flat_map(|s| s.plans.iter_mut())
            .filter(|p| p.engine == engine)
        {
            let metadata = plan
                .metadata
                .get_or_insert_with(|| Value::Object(Default::default()));
            let Value::Object(metadata) = metadata else {
                anyhow::bail!(
                    "plan {:?}: `metadata` must be a JSON object to add engine facts to it",
                    plan.name
                );
            };
            for (key, value) in fields {
                metadata.insert(key.clone(), value.clone());
            }
            if !bullets.is_empty() {
                let list = metadata
                    .entry("bullets")
                    .or_insert_with(|| Value::Array(Vec::new()));
                let Value::Array(list) = list else {
                    anyhow::bail!("plan {:?}: `metadata.bullets` must be a list", plan.name);
                };
                for bullet in bullets {
                    if !list.iter().any(|b| b == bullet) {
                        list.push(Value::from(*bullet));
                    }
                }
            }
        }
        self.rendered = serde_json::to_vec(&CatalogBody {
            services: &self.services,
        })?
        .into();
        Ok(self)
    }

    /// [`Self::load`], then the engine facts `settings` decide ([`engine_metadata`]): what the API serves.
    pub fn load_for(settings: &crate::config::Settings) -> anyhow::Result<Self> {
        let mut services = read_services(&settings.plans_dir)?;
        choose_engines(&mut services, &settings.plan_engines())?;
        if settings.s3_credentials() == Some(crate::config::S3Credentials::Shared) {
            without_credentials_of_their_own(&mut services, Engine::S3);
        }
        let mut catalog = Self::from_services(services, &settings.available_engines())?;
        for (engine, fields, bullets) in engine_metadata(settings) {
            catalog = catalog.with_engine_metadata(engine, &fields, &bullets)?;
        }
        Ok(catalog)
    }

    /// The `GET /v2/catalog` body.
    pub fn rendered(&self) -> Arc<[u8]> {
        self.rendered.clone()
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn service(&self, service_id: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.id == service_id)
    }

    /// The plan `plan_id` of service `service_id`, if both are published.
    pub fn plan(&self, service_id: &str, plan_id: &str) -> Option<PlanRef<'_>> {
        let service = self.service(service_id)?;
        let plan = service.plans.iter().find(|p| p.id == plan_id)?;
        Some(PlanRef { service, plan })
    }

    /// Any published plan with this id (for rows whose service is known already).
    pub fn plan_by_id(&self, plan_id: &str) -> Option<PlanRef<'_>> {
        self.services.iter().find_map(|service| {
            let plan = service.plans.iter().find(|p| p.id == plan_id)?;
            Some(PlanRef { service, plan })
        })
    }

    /// Checks `parameters` against the plan's schema for `which`. Without a schema, any object passes.
    pub fn validate(
        &self,
        plan_id: &str,
        which: SchemaFor,
        parameters: &Value,
    ) -> Result<(), ParameterError> {
        if !parameters.is_object() {
            return Err(ParameterError("parameters must be a JSON object".into()));
        }
        let Some(validator) = self.validators.get(&(plan_id.to_string(), which)) else {
            return Ok(());
        };
        let messages: Vec<String> = validator
            .iter_errors(parameters)
            .take(5)
            .map(|e| {
                let path = e.instance_path().to_string();
                if path.is_empty() {
                    format!("parameters: {e}")
                } else {
                    format!("parameters{path}: {e}")
                }
            })
            .collect();
        if messages.is_empty() {
            Ok(())
        } else {
            Err(ParameterError(messages.join("; ")))
        }
    }
}

/// Bindings that share the store's keys cannot be revoked one by one: no rotation and no expiry for them.
fn without_credentials_of_their_own(services: &mut [Service], engine: Engine) {
    for plan in services
        .iter_mut()
        .flat_map(|s| s.plans.iter_mut())
        .filter(|p| p.engine == engine)
    {
        plan.binding_rotatable = Some(false);
        plan.binding_expiry = None;
    }
}

/// Puts the plan's `expires_in` bounds into its bind schema (or takes a stale one out), so the catalog tells
/// clients and the schema check enforces them.
fn publish_binding_expiry(plan: &mut Plan) -> anyhow::Result<()> {
    if let Some(expiry) = &plan.binding_expiry
        && (expiry.min_seconds == 0 || expiry.min_seconds > expiry.max_seconds)
    {
        anyhow::bail!(
            "plan {:?}: binding_expiry needs 0 < min_seconds <= max_seconds",
            plan.name
        );
    }
    let Some(expiry) = plan.binding_expiry else {
        let properties = plan
            .schemas
            .service_binding
            .as_mut()
            .and_then(|s| s.create.as_mut());
        if let Some(Value::Object(properties)) =
            properties.and_then(|c| c.parameters.get_mut("properties"))
        {
            properties.remove(EXPIRES_IN);
        }
        return Ok(());
    };
    let create = plan
        .schemas
        .service_binding
        .get_or_insert_with(Default::default)
        .create
        .get_or_insert_with(|| InputSchema {
            parameters: serde_json::json!({"type": "object", "properties": {}}),
        });
    let Some(properties) = create
        .parameters
        .get_mut("properties")
        .and_then(Value::as_object_mut)
    else {
        anyhow::bail!(
            "plan {:?}: the bind schema needs a `properties` object to publish expires_in in",
            plan.name
        );
    };
    properties.insert(EXPIRES_IN.into(), expiry.schema());
    Ok(())
}

/// Plan metadata that depends on settings, per engine: `(engine, fields, bullets)`.
///
/// `s3`: `"credentials": "per-binding"` when each binding gets its own access key (AWS, or an S3-compatible
/// store with `S3_COMPATIBLE_IAM_ENDPOINT`), `"shared"` when every binding gets the store keys berth was
/// configured with.
pub fn engine_metadata(
    settings: &crate::config::Settings,
) -> Vec<(Engine, serde_json::Map<String, Value>, Vec<&'static str>)> {
    let mut out = Vec::new();
    if let Some(mode) = settings.s3_credentials() {
        let mut fields = serde_json::Map::new();
        fields.insert("credentials".into(), Value::from(mode.as_str()));
        out.push((Engine::S3, fields, vec![mode.bullet()]));
    }
    out
}

/// A plan of the catalog files that these settings leave out of the catalog: its engine is not configured here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpublishedPlan {
    pub service: String,
    pub plan: String,
    pub engine: Engine,
}

/// The plans [`Catalog::load_for`] would leave out under `settings`, in catalog order, so start-up can tell an
/// operator what to install or set for them.
pub fn unpublished_plans(
    settings: &crate::config::Settings,
) -> anyhow::Result<Vec<UnpublishedPlan>> {
    let mut services = read_services(&settings.plans_dir)?;
    choose_engines(&mut services, &settings.plan_engines())?;
    let available = settings.available_engines();
    Ok(services
        .into_iter()
        .flat_map(|service| {
            let name = service.name;
            service
                .plans
                .into_iter()
                .filter(|plan| !available.contains(&plan.engine))
                .map(move |plan| UnpublishedPlan {
                    service: name.clone(),
                    plan: plan.name,
                    engine: plan.engine,
                })
        })
        .collect())
}

fn parse_service(file: &Path, text: &str) -> anyhow::Result<Service> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let service: Service = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!(
            "catalog file {}: field `{}`: {}",
            file.display(),
            path,
            e.inner()
        )
    })?;
    let fail = |field: String, why: &str| {
        anyhow::anyhow!("catalog file {}: field `{field}`: {why}", file.display())
    };
    if service.id.trim().is_empty() {
        return Err(fail("id".into(), "must not be empty"));
    }
    if service.name.trim().is_empty() {
        return Err(fail("name".into(), "must not be empty"));
    }
    if service.plans.is_empty() {
        return Err(fail("plans".into(), "a service needs at least one plan"));
    }
    for (i, plan) in service.plans.iter().enumerate() {
        if plan.id.trim().is_empty() {
            return Err(fail(format!("plans[{i}].id"), "must not be empty"));
        }
        if plan.name.trim().is_empty() {
            return Err(fail(format!("plans[{i}].name"), "must not be empty"));
        }
        for (_, name, schema) in plan.schemas.each() {
            if let Some(Err(e)) = schema.map(|s| jsonschema::validator_for(&s.parameters)) {
                return Err(fail(
                    format!("plans[{i}].schemas.{name}.parameters"),
                    &e.to_string(),
                ));
            }
        }
    }
    Ok(service)
}

fn check_unique(services: &[Service]) -> anyhow::Result<()> {
    let mut ids = HashSet::new();
    let mut names = HashSet::new();
    for service in services {
        if !ids.insert(service.id.as_str()) {
            anyhow::bail!("catalog: id {:?} is used twice", service.id);
        }
        if !names.insert(service.name.as_str()) {
            anyhow::bail!("catalog: service name {:?} is used twice", service.name);
        }
        let mut plan_names = HashSet::new();
        for plan in &service.plans {
            if !ids.insert(plan.id.as_str()) {
                anyhow::bail!("catalog: id {:?} is used twice", plan.id);
            }
            if !plan_names.insert(plan.name.as_str()) {
                anyhow::bail!(
                    "catalog: service {:?} has two plans named {:?}",
                    service.name,
                    plan.name
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-cat-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_shipped_catalog_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
        let catalog = Catalog::load(&dir, KNOWN_ENGINES).unwrap();
        let body: Value = serde_json::from_slice(&catalog.rendered()).unwrap();
        let services = body["services"].as_array().unwrap();
        assert!(services.iter().any(|s| s["name"] == "postgres"));
        assert!(!String::from_utf8_lossy(&catalog.rendered()).contains("\"engine\""));

        // A shared database cannot become a dedicated server (the dedicated plan is not plan_updateable).
        let plan = |name: &str| {
            catalog
                .services()
                .iter()
                .flat_map(|s| &s.plans)
                .find(|p| p.name == name)
                .unwrap()
                .id
                .clone()
        };
        let shared = catalog.plan_by_id(&plan("shared")).unwrap();
        let dedicated = catalog.plan_by_id(&plan("dedicated")).unwrap();
        assert!(shared.cannot_change_to(dedicated.plan).is_some());
        assert!(!dedicated.plan_updateable());
    }

    fn s3_plans(catalog: &Catalog) -> Vec<Value> {
        let body: Value = serde_json::from_slice(&catalog.rendered()).unwrap();
        let s3 = body["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "s3")
            .cloned();
        s3.map(|s| s["plans"].as_array().unwrap().clone())
            .unwrap_or_default()
    }

    #[test]
    fn the_catalog_says_which_credentials_s3_bindings_get() {
        let plans_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
        let settings = |extra: Value| -> crate::config::Settings {
            let mut base = serde_json::json!({ "plans_dir": plans_dir });
            base.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value(base).unwrap()
        };
        let compatible = serde_json::json!({
            "s3_compatible_endpoint": "http://127.0.0.1:1", "s3_compatible_access_key": "k",
            "s3_compatible_secret_key": "s",
        });
        let mut with_iam = compatible.clone();
        with_iam["s3_compatible_iam_endpoint"] = "http://127.0.0.1:1".into();
        let aws = serde_json::json!({ "aws_region": "us-east-1", "aws_access_key_id": "k" });
        for (extra, mode, bullet) in [
            (compatible, "shared", "Bindings share the store's keys"),
            (with_iam, "per-binding", "Access key per binding"),
            (aws, "per-binding", "Access key per binding"),
        ] {
            let catalog = Catalog::load_for(&settings(extra)).unwrap();
            let plans = s3_plans(&catalog);
            assert_eq!(plans.len(), 4);
            for plan in plans {
                assert_eq!(plan["metadata"]["credentials"], mode, "{plan}");
                let bullets = plan["metadata"]["bullets"].as_array().unwrap();
                assert!(
                    bullets
                        .iter()
                        .any(|b| b.as_str().unwrap().starts_with(bullet)),
                    "{plan}"
                );
                assert_eq!(
                    bullets
                        .iter()
                        .filter(|b| b.as_str().unwrap().contains("key"))
                        .count(),
                    1,
                    "{plan}"
                );
                assert!(
                    plan["metadata"]["displayName"].is_string(),
                    "the file's metadata stays"
                );
            }
        }
        // Without an S3 store there is no s3 service to describe.
        assert!(s3_plans(&Catalog::load_for(&settings(serde_json::json!({}))).unwrap()).is_empty());
    }

    /// Plans whose bindings have credentials of their own are `binding_rotatable` and publish `expires_in` with
    /// their bounds in the bind schema; S3 bindings that share the store's keys (which cannot be revoked one
    /// by one) are neither.
    #[test]
    fn rotatable_and_expiring_bindings_where_credentials_are_their_own() {
        let plans_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
        let load = |extra: Value| {
            let mut base = serde_json::json!({
                "plans_dir": plans_dir, "local_engine": true, "shared_postgres_url": "postgres://su@127.0.0.1/x",
            });
            base.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let settings: crate::config::Settings = serde_json::from_value(base).unwrap();
            let catalog = Catalog::load_for(&settings).unwrap();
            serde_json::from_slice::<Value>(&catalog.rendered()).unwrap()
        };
        let plans = |body: &Value, service: &str| -> Vec<Value> {
            let found = body["services"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == service);
            found
                .map(|s| s["plans"].as_array().unwrap().clone())
                .unwrap_or_default()
        };
        let expires_in = |plan: &Value| {
            plan["schemas"]["service_binding"]["create"]["parameters"]["properties"][EXPIRES_IN]
                .clone()
        };
        let compatible = serde_json::json!({
            "s3_compatible_endpoint": "http://127.0.0.1:1", "s3_compatible_access_key": "k",
            "s3_compatible_secret_key": "s",
        });
        let mut with_iam = compatible.clone();
        with_iam["s3_compatible_iam_endpoint"] = "http://127.0.0.1:1".into();
        let aws = serde_json::json!({ "aws_region": "us-east-1", "aws_access_key_id": "k" });
        for (extra, own_keys) in [(compatible, false), (with_iam, true), (aws, true)] {
            let body = load(extra);
            let postgres = plans(&body, "postgres");
            assert!(
                postgres.len() >= 2,
                "shared and dedicated at least: {}",
                postgres.len()
            );
            for plan in postgres.iter().chain(&plans(&body, "s3")) {
                let own = own_keys || plan["metadata"]["credentials"].is_null();
                assert_eq!(plan["binding_rotatable"], own, "{}", plan["name"]);
                if own {
                    let schema = expires_in(plan);
                    assert_eq!(
                        (
                            schema["type"].as_str(),
                            schema["minimum"].as_u64(),
                            schema["maximum"].as_u64()
                        ),
                        (Some("integer"), Some(600), Some(7200)),
                        "{}",
                        plan["name"]
                    );
                } else {
                    assert!(expires_in(plan).is_null(), "{}", plan["name"]);
                }
                assert!(
                    plan.get("binding_expiry").is_none(),
                    "berth's own field stays private"
                );
            }
        }
    }

    #[test]
    fn dedicated_spot_needs_aws_and_dedicated_moves_to_ec2_only_when_asked() {
        let plans_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
        let load = |extra: Value| {
            let mut base = serde_json::json!({ "plans_dir": plans_dir, "local_engine": true });
            base.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let settings: crate::config::Settings = serde_json::from_value(base).unwrap();
            settings
                .check()
                .map(|()| Catalog::load_for(&settings).unwrap())
        };
        let engine_of = |catalog: &Catalog, name: &str| {
            catalog
                .services()
                .iter()
                .flat_map(|s| &s.plans)
                .find(|p| p.name == name)
                .map(|p| p.engine.as_str())
        };
        let local = load(serde_json::json!({})).unwrap();
        assert_eq!(engine_of(&local, "dedicated"), Some("local"));
        assert_eq!(
            engine_of(&local, "dedicated-spot"),
            None,
            "no AWS, no spot plan"
        );
        let aws = serde_json::json!({ "aws_region": "us-east-1", "aws_access_key_id": "k" });
        let with_aws = load(aws.clone()).unwrap();
        assert_eq!(
            engine_of(&with_aws, "dedicated"),
            Some("local"),
            "dedicated stays local by default"
        );
        assert_eq!(engine_of(&with_aws, "dedicated-spot"), Some("ec2"));
        let mut on_ec2 = aws;
        on_ec2["dedicated_engine"] = "ec2".into();
        assert_eq!(engine_of(&load(on_ec2).unwrap(), "dedicated"), Some("ec2"));
        assert!(
            load(serde_json::json!({ "dedicated_engine": "ec2" })).is_err(),
            "ec2 without AWS is refused"
        );
        assert!(load(serde_json::json!({ "dedicated_engine": "warp" })).is_err());
    }

    #[test]
    fn ha_moves_to_ec2_only_when_asked_and_aws_is_there() {
        let plans_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
        let load = |extra: Value| {
            let mut base = serde_json::json!({ "plans_dir": plans_dir });
            base.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let settings: crate::config::Settings = serde_json::from_value(base).unwrap();
            settings
                .check()
                .map(|()| Catalog::load_for(&settings).unwrap())
        };
        let ha_engine = |catalog: &Catalog| {
            catalog
                .services()
                .iter()
                .flat_map(|s| &s.plans)
                .find(|p| p.name == "ha")
                .map(|p| p.engine.as_str())
        };
        let aws = serde_json::json!({ "aws_region": "us-east-1", "aws_access_key_id": "k" });
        assert_eq!(
            ha_engine(&load(aws.clone()).unwrap()),
            None,
            "ha stays local by default (not published here)"
        );
        let mut on_ec2 = aws;
        on_ec2["ha_engine"] = "ec2".into();
        let catalog = load(on_ec2).unwrap();
        assert_eq!(ha_engine(&catalog), Some("ha_ec2"));
        let plan = catalog
            .services()
            .iter()
            .flat_map(|s| &s.plans)
            .find(|p| p.name == "ha")
            .unwrap();
        let schema = &plan
            .schemas
            .service_instance
            .as_ref()
            .unwrap()
            .create
            .as_ref()
            .unwrap()
            .parameters;
        for key in [
            "cpu_min",
            "ram_min",
            "storage_min",
            "instance_types",
            "zones",
            "spot",
            "region",
            "public_ip",
        ] {
            assert!(
                schema["properties"][key].is_object(),
                "{key} in the ha schema"
            );
        }
        assert!(
            load(serde_json::json!({ "ha_engine": "ec2" })).is_err(),
            "ec2 without AWS is refused"
        );
        assert!(load(serde_json::json!({ "ha_engine": "k8s" })).is_err());
    }

    #[test]
    fn engine_metadata_touches_only_that_engines_plans() {
        let services: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"id":"s","name":"x","description":"d","bindable":true,"plans":[
                {"id":"a","name":"a","description":"d","engine":"s3"},
                {"id":"b","name":"b","description":"d","engine":"shared","metadata":{"bullets":["b"]}}]}
        ]))
        .unwrap();
        let mut fields = serde_json::Map::new();
        fields.insert("credentials".into(), "shared".into());
        let catalog = Catalog::from_services(services, KNOWN_ENGINES)
            .unwrap()
            .with_engine_metadata(Engine::S3, &fields, &["one"])
            .unwrap()
            .with_engine_metadata(Engine::S3, &fields, &["one"])
            .unwrap();
        let body: Value = serde_json::from_slice(&catalog.rendered()).unwrap();
        let plans = &body["services"][0]["plans"];
        assert_eq!(
            plans[0]["metadata"],
            serde_json::json!({"credentials": "shared", "bullets": ["one"]})
        );
        assert_eq!(plans[1]["metadata"], serde_json::json!({"bullets": ["b"]}));
        assert_eq!(
            catalog
                .plan_by_id("a")
                .unwrap()
                .plan
                .metadata
                .as_ref()
                .unwrap()["credentials"],
            "shared"
        );
    }

    #[test]
    fn a_bad_field_names_file_and_field() {
        let dir = tmp();
        write(
            &dir,
            "x.json",
            r#"{"id":"s","name":"x","description":"d","bindable":"yes","plans":[]}"#,
        );
        let err = Catalog::load(&dir, KNOWN_ENGINES).unwrap_err().to_string();
        assert!(err.contains("x.json") && err.contains("bindable"), "{err}");

        write(
            &dir,
            "x.json",
            r#"{"id":"s","name":"x","description":"d","bindable":true,
                "plans":[{"id":"p","name":"p","description":"d","engine":"warp"}]}"#,
        );
        let err = Catalog::load(&dir, KNOWN_ENGINES).unwrap_err().to_string();
        assert!(err.contains("plans[0].engine"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unknown_engine_fails_loading_naming_file_field_and_name() {
        let dir = tmp();
        for (plan, field) in [
            (
                r#"{"id":"p","name":"p","description":"d","engine":"warp"}"#,
                "plans[0].engine",
            ),
            (
                r#"{"id":"p","name":"p","description":"d","engine":"local","alternative_engines":["ec2","k8s"]}"#,
                "plans[0].alternative_engines[1]",
            ),
        ] {
            let service = format!(
                r#"{{"id":"s","name":"x","description":"d","bindable":true,"plans":[{plan}]}}"#
            );
            write(&dir, "engines.json", &service);
            let err = Catalog::load(&dir, KNOWN_ENGINES).unwrap_err().to_string();
            let bad = if field.ends_with("engine") {
                "warp"
            } else {
                "k8s"
            };
            assert!(
                err.contains("engines.json") && err.contains(field) && err.contains(bad),
                "{err}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unavailable_engines_hide_plans_and_schemas_validate() {
        let dir = tmp();
        write(
            &dir,
            "x.json",
            r#"{"id":"s","name":"x","description":"d","bindable":true,
                "plans":[{"id":"p","name":"p","description":"d","engine":"shared",
                  "schemas":{"service_instance":{"create":{"parameters":{
                     "type":"object","properties":{"size":{"type":"integer"}},"additionalProperties":false}}}}}]}"#,
        );
        assert!(Catalog::load(&dir, &[]).unwrap().services().is_empty());
        let catalog = Catalog::load(&dir, &[Engine::Shared]).unwrap();
        assert!(
            catalog
                .validate("p", SchemaFor::Provision, &serde_json::json!({"size": 3}))
                .is_ok()
        );
        let err = catalog
            .validate(
                "p",
                SchemaFor::Provision,
                &serde_json::json!({"size": "big"}),
            )
            .unwrap_err();
        assert!(err.0.contains("/size"), "{err}");
        assert!(
            catalog
                .validate("p", SchemaFor::Bind, &serde_json::json!({"any": 1}))
                .is_ok()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
