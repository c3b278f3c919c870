//! `TestApp`: the router over a test database, typed OSB requests, and a stand-in for the worker.

#![allow(dead_code)]

use std::{path::Path, sync::Arc};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Method, Request, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use berth_api::{AppState, BrokerAuth};
use broker::{
    catalog::{Catalog, KNOWN_ENGINES, Service},
    crypto::Cipher,
    webhook_target::TargetPolicy,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;
use uuid::Uuid;

pub const USER: &str = "broker-user";
pub const PASSWORD: &str = "broker-pass";
pub const MAX_BODY: usize = 16 * 1024;

pub const PG_SERVICE: &str = "3bdd3b6c-801f-470b-a45f-bc1849fa2124";
pub const PG_SHARED: &str = "707a3e6f-f8db-4339-88da-1533837a9810";
pub const PG_VERSION: &str = "1.0.0";

/// The shipped `s3` service and its `basic` plan, published as with per-binding credentials (AWS settings).
pub const S3_SERVICE: &str = "6f0c2f4e-3b1a-4c55-9d0e-8a4b7c2e1f01";
pub const S3_BASIC: &str = "b1c7a3e0-52d4-4f0a-8e61-3d2f9a7c5b11";

/// A second service, only in tests, with plans that exercise plan changes and bindability.
pub const T_SERVICE: &str = "test-service";
pub const T_SMALL: &str = "test-small";
pub const T_LARGE: &str = "test-large";
pub const T_FIXED: &str = "test-fixed";
pub const T_UNBINDABLE: &str = "test-unbindable";

pub struct TestApp {
    pub router: Router,
    pub pool: PgPool,
    pub cipher: Cipher,
    state: AppState,
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl TestResponse {
    /// The `operation` of a 202.
    pub fn operation(&self) -> String {
        assert_eq!(self.status, StatusCode::ACCEPTED, "{self:?}");
        self.body["operation"]
            .as_str()
            .expect("202 without operation")
            .to_string()
    }

    /// Asserts an OSB error body with this status (and `error` code, if given); returns the description.
    pub fn assert_osb_error(&self, status: StatusCode, code: Option<&str>) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let description = self.body["description"]
            .as_str()
            .unwrap_or_else(|| panic!("no description: {self:?}"));
        assert!(!description.is_empty());
        if let Some(code) = code {
            assert_eq!(self.body["error"], code, "{self:?}");
        }
        description.to_string()
    }
}

fn test_catalog() -> Catalog {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
    let shipped = Catalog::load(&dir, KNOWN_ENGINES).expect("loading plans/");
    let extra: Service = serde_json::from_value(json!({
        "id": T_SERVICE, "name": "test", "description": "test service", "bindable": true,
        "plan_updateable": true,
        "plans": [
            {"id": T_SMALL, "name": "small", "description": "d", "engine": "shared",
             "maintenance_info": {"version": "2.0.0"}},
            {"id": T_LARGE, "name": "large", "description": "d", "engine": "shared",
             "maintenance_info": {"version": "2.1.0"}},
            {"id": T_FIXED, "name": "fixed", "description": "d", "engine": "shared", "plan_updateable": false},
            {"id": T_UNBINDABLE, "name": "unbindable", "description": "d", "engine": "shared", "bindable": false}
        ]
    }))
    .unwrap();
    let mut services = shipped.services().to_vec();
    services.push(extra);
    let mut per_binding = serde_json::Map::new();
    per_binding.insert("credentials".into(), json!("per-binding"));
    Catalog::from_services(services, KNOWN_ENGINES)
        .unwrap()
        .with_engine_metadata(broker::catalog::Engine::S3, &per_binding, &[])
        .unwrap()
}

pub fn provision_body() -> Value {
    json!({
        "service_id": PG_SERVICE, "plan_id": PG_SHARED,
        "organization_guid": "org-1", "space_guid": "space-1",
        "context": {"platform": "cloudfoundry"},
        "parameters": {"extensions": ["citext"]},
    })
}

pub fn bind_body() -> Value {
    json!({
        "service_id": PG_SERVICE, "plan_id": PG_SHARED,
        "bind_resource": {"app_guid": "app-1"},
        "parameters": {"access": "read-only"},
    })
}

impl TestApp {
    /// The suites' webhook receivers listen on 127.0.0.1: loopback targets allowed.
    pub fn new(pool: PgPool) -> Self {
        Self::with_options(
            pool,
            TargetPolicy::new(true, None).unwrap(),
            std::time::Duration::from_secs(5),
        )
    }

    pub fn with_webhook_targets(pool: PgPool, webhook_targets: TargetPolicy) -> Self {
        Self::with_options(pool, webhook_targets, std::time::Duration::from_secs(5))
    }

    /// With `sync_wait` as the longest wait of a request answered synchronously.
    pub fn with_sync_wait(pool: PgPool, sync_wait: std::time::Duration) -> Self {
        Self::with_options(pool, TargetPolicy::new(true, None).unwrap(), sync_wait)
    }

    /// With dashboard links made as `links` says.
    pub fn with_dashboard(pool: PgPool, links: berth_api::dashboard::DashboardLinks) -> Self {
        let mut app = Self::new(pool);
        let state = app.state.clone();
        app.router = berth_api::router(AppState {
            dashboard: Arc::new(links),
            ..state
        });
        app
    }

    fn with_options(
        pool: PgPool,
        webhook_targets: TargetPolicy,
        sync_wait: std::time::Duration,
    ) -> Self {
        let cipher = Cipher::from_key(&[42; 32]);
        let state = AppState {
            db: pool.clone(),
            catalog: Arc::new(test_catalog()),
            cipher: cipher.clone(),
            auth: Arc::new(BrokerAuth::new(USER.into(), PASSWORD.into())),
            max_body_bytes: MAX_BODY,
            provisions: berth_api::provision_batch::ProvisionBatcher::start(
                pool.clone(),
                berth_api::PROVISION_WRITERS,
            ),
            requests: Default::default(),
            webhook_targets: Arc::new(webhook_targets),
            task_waits: berth_api::task_waits::TaskWaits::start(pool.clone()),
            sync_wait,
            dashboard: Default::default(),
            pool_targets: Default::default(),
        };
        Self {
            router: berth_api::router(state.clone()),
            pool,
            cipher,
            state,
        }
    }

    pub fn auth_header() -> String {
        format!("Basic {}", STANDARD.encode(format!("{USER}:{PASSWORD}")))
    }

    /// Sends a request as-is (no headers added).
    pub async fn send(&self, request: Request<Body>) -> TestResponse {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        TestResponse {
            status,
            headers,
            body,
            text,
        }
    }

    /// A request with the broker's credentials and `X-Broker-API-Version: 2.17`.
    pub fn request(method: Method, uri: &str) -> axum::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", Self::auth_header())
            .header("x-broker-api-version", "2.17")
    }

    pub async fn call(&self, method: Method, uri: &str, body: Option<&Value>) -> TestResponse {
        self.send_with_body(Self::request(method, uri), body).await
    }

    /// Sends the request `builder` makes, with `body` as JSON (or no body).
    pub async fn send_with_body(
        &self,
        builder: axum::http::request::Builder,
        body: Option<&Value>,
    ) -> TestResponse {
        let request = match body {
            Some(body) => builder
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
            None => builder.body(Body::empty()).unwrap(),
        };
        self.send(request).await
    }

    pub async fn provision(&self, id: &str, body: &Value) -> TestResponse {
        self.call(
            Method::PUT,
            &format!("/v2/service_instances/{id}?accepts_incomplete=true"),
            Some(body),
        )
        .await
    }

    pub async fn update(&self, id: &str, body: &Value) -> TestResponse {
        self.call(
            Method::PATCH,
            &format!("/v2/service_instances/{id}?accepts_incomplete=true"),
            Some(body),
        )
        .await
    }

    pub async fn deprovision(&self, id: &str) -> TestResponse {
        let uri = format!(
            "/v2/service_instances/{id}?service_id={PG_SERVICE}&plan_id={PG_SHARED}&accepts_incomplete=true"
        );
        self.call(Method::DELETE, &uri, None).await
    }

    pub async fn fetch_instance(&self, id: &str) -> TestResponse {
        self.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
            .await
    }

    pub async fn last_operation(&self, id: &str, operation: Option<&str>) -> TestResponse {
        let mut uri = format!(
            "/v2/service_instances/{id}/last_operation?service_id={PG_SERVICE}&plan_id={PG_SHARED}"
        );
        if let Some(op) = operation {
            uri.push_str(&format!("&operation={op}"));
        }
        self.call(Method::GET, &uri, None).await
    }

    pub async fn bind(&self, id: &str, bid: &str, body: &Value) -> TestResponse {
        let uri =
            format!("/v2/service_instances/{id}/service_bindings/{bid}?accepts_incomplete=true");
        self.call(Method::PUT, &uri, Some(body)).await
    }

    pub async fn unbind(&self, id: &str, bid: &str) -> TestResponse {
        let uri = format!(
            "/v2/service_instances/{id}/service_bindings/{bid}?service_id={PG_SERVICE}&plan_id={PG_SHARED}&accepts_incomplete=true"
        );
        self.call(Method::DELETE, &uri, None).await
    }

    pub async fn fetch_binding(&self, id: &str, bid: &str) -> TestResponse {
        self.call(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/{bid}"),
            None,
        )
        .await
    }

    pub async fn binding_last_operation(
        &self,
        id: &str,
        bid: &str,
        operation: Option<&str>,
    ) -> TestResponse {
        let mut uri = format!("/v2/service_instances/{id}/service_bindings/{bid}/last_operation");
        if let Some(op) = operation {
            uri.push_str(&format!("?operation={op}"));
        }
        self.call(Method::GET, &uri, None).await
    }

    // ---- the worker's side, in SQL ----

    /// Marks a task finished, as the worker would.
    pub async fn finish(&self, operation: &str, state: &str, error: Option<&str>) {
        let id = Uuid::parse_str(operation).unwrap();
        let done = sqlx::query(
            "UPDATE tasks SET state = $2, last_error = $3, finished_at = now(), updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(error)
        .execute(&self.pool)
        .await
        .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }

    pub async fn set_running(&self, operation: &str, progress: Option<&str>) {
        sqlx::query("UPDATE tasks SET state = 'running', progress = $2 WHERE id = $1")
            .bind(Uuid::parse_str(operation).unwrap())
            .bind(progress)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Provisions `id` and marks the provision succeeded.
    pub async fn provisioned(&self, id: &str) {
        let op = self.provision(id, &provision_body()).await.operation();
        self.finish(&op, "succeeded", None).await;
    }

    /// What a successful bind leaves: sealed credentials, endpoints in details, the task succeeded.
    pub async fn complete_bind(&self, operation: &str, binding_id: &str, credentials: &Value) {
        sqlx::query("UPDATE service_bindings SET credentials = $2, details = $3 WHERE id = $1")
            .bind(binding_id)
            .bind(self.cipher.seal_json(credentials))
            .bind(json!({"endpoints": [{"host": "db.example", "ports": ["5432"], "protocol": "tcp"}]}))
            .execute(&self.pool)
            .await
            .unwrap();
        self.finish(operation, "succeeded", None).await;
    }

    /// Provisions `id`, binds `bid` and completes both.
    pub async fn bound(&self, id: &str, bid: &str) {
        self.provisioned(id).await;
        let op = self.bind(id, bid, &bind_body()).await.operation();
        self.complete_bind(
            &op,
            bid,
            &json!({"DATABASE_URL": "postgres://u:p@db.example/d"}),
        )
        .await;
    }

    /// What a successful deprovision leaves: the row gone, the task succeeded.
    pub async fn complete_deprovision(&self, operation: &str, instance_id: &str) {
        sqlx::query("DELETE FROM service_instances WHERE id = $1")
            .bind(instance_id)
            .execute(&self.pool)
            .await
            .unwrap();
        self.finish(operation, "succeeded", None).await;
    }

    pub async fn complete_unbind(&self, operation: &str, binding_id: &str) {
        sqlx::query("DELETE FROM service_bindings WHERE id = $1")
            .bind(binding_id)
            .execute(&self.pool)
            .await
            .unwrap();
        self.finish(operation, "succeeded", None).await;
    }

    /// Row counts of (service_instances, service_bindings, tasks).
    pub async fn counts(&self) -> (i64, i64, i64) {
        let row: (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM service_instances), (SELECT count(*) FROM service_bindings),
                    (SELECT count(*) FROM tasks)",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap();
        row
    }

    /// Every broker table's name, row count and a digest of its rows' contents (order-independent), so
    /// a refused request that changed a row in place shows up as well as one that added or removed one.
    pub async fn contents(&self) -> Vec<(String, i64, String)> {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables
             WHERE schemaname = 'public' AND tablename NOT LIKE '\\_sqlx%' ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert!(
            tables.len() >= 5,
            "the broker's tables are there: {tables:?}"
        );
        let mut out = Vec::with_capacity(tables.len());
        for table in tables {
            let (rows, digest): (i64, String) = sqlx::query_as(&format!(
                "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM \"{table}\" t"
            ))
            .fetch_one(&self.pool)
            .await
            .unwrap();
            out.push((table, rows, digest));
        }
        out
    }

    /// A binding's stored parameters.
    pub async fn binding_parameters(&self, binding_id: &str) -> Value {
        sqlx::query_scalar("SELECT parameters FROM service_bindings WHERE id = $1")
            .bind(binding_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn task(&self, operation: &str) -> sqlx::postgres::PgRow {
        sqlx::query("SELECT * FROM tasks WHERE id = $1")
            .bind(Uuid::parse_str(operation).unwrap())
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// Asserts that `f` (a refused request) leaves every broker table as it was: the same rows, the same contents.
#[macro_export]
macro_rules! assert_unchanged {
    ($app:expr, $body:expr) => {{
        let before = $app.contents().await;
        let out = $body;
        assert_eq!(
            $app.contents().await,
            before,
            "a refused request changed rows"
        );
        out
    }};
}
