//! `GET /openapi.json`: served without credentials, a valid OpenAPI 3.1 document (it parses back, and every
//! `$ref` in it resolves), and its paths are exactly the routes the router serves under `/v2` and `/berth/v1`,
//! method for method, so a route added without an annotation (or an annotation without its route) fails here.

use std::collections::BTreeSet;

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::TestApp;

/// The prefixes the document covers.
const DOCUMENTED: &[&str] = &["/v2/", "/berth/v1/"];

/// Methods a route may take, as the document's path items name them.
const METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn the_document_is_served_without_credentials_and_parses_as_openapi_3_1(pool: PgPool) {
    let app = TestApp::new(pool);
    let res = app
        .send(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.headers["content-type"], "application/json");
    assert_eq!(res.body["openapi"], "3.1.0");
    let parsed: utoipa::openapi::OpenApi =
        serde_json::from_str(&res.text).expect("the document parses back as OpenAPI 3.1");
    assert_eq!(
        serde_json::to_value(&parsed).unwrap(),
        res.body,
        "nothing is lost in a round trip"
    );
    assert_eq!(
        res.body,
        serde_json::to_value(berth_api::openapi::document()).unwrap(),
        "the served document is the generated one"
    );

    let mut refs = Vec::new();
    collect_refs(&res.body, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{reference} is not a local reference"));
        assert!(
            res.body.pointer(pointer).is_some(),
            "{reference} does not resolve"
        );
    }

    // Every operation: an id of its own, basic auth, the OSB error shape on its refusals, and on /v2 the
    // version header.
    let mut ids = BTreeSet::new();
    assert_eq!(
        res.body["security"],
        serde_json::json!([{"broker_basic_auth": []}])
    );
    assert_eq!(
        res.body["components"]["securitySchemes"]["broker_basic_auth"]["scheme"],
        "basic"
    );
    for (path, method, operation) in operations(&res.body) {
        let id = operation["operationId"].as_str().expect("an operation id");
        assert!(ids.insert(id.to_string()), "operation id {id} twice");
        let responses = operation["responses"].as_object().unwrap();
        assert!(responses.contains_key("401"), "{method} {path}: no 401");
        let names: Vec<&str> = operation["parameters"]
            .as_array()
            .map(|p| p.iter().filter_map(|p| p["name"].as_str()).collect())
            .unwrap_or_default();
        if path.starts_with("/v2/") {
            assert!(
                names.contains(&"X-Broker-API-Version") && responses.contains_key("412"),
                "{method} {path}: no version header or 412"
            );
        }
        for name in path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        {
            assert!(
                names.contains(&name),
                "{method} {path}: {name} undocumented"
            );
        }
        for (status, response) in responses {
            if status.starts_with('4') && status != "410" {
                let schema = resolve(&res.body, response);
                assert_eq!(
                    schema["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
    }
    // Stored words are documented as the words (not the Rust variant names).
    assert_eq!(
        res.body["components"]["schemas"]["SnapshotState"]["enum"],
        serde_json::json!(["pending", "ready", "failed"])
    );
    let error = &res.body["components"]["schemas"]["ErrorBody"];
    assert_eq!(
        error["required"],
        serde_json::json!(["error", "description"])
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn every_route_served_is_documented_and_every_documented_route_is_served(pool: PgPool) {
    let app = TestApp::new(pool);
    let document = serde_json::to_value(berth_api::openapi::document()).unwrap();
    let documented: BTreeSet<(String, String)> = operations(&document)
        .map(|(path, method, _)| (path.to_string(), method.to_uppercase()))
        .collect();

    let served = served_routes(&app.router);
    assert!(
        served.contains(&("/v2/catalog".to_string(), "GET".to_string())),
        "the router's routes were not read (did axum's Debug output change?): {served:?}"
    );
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes without a #[utoipa::path] in openapi::ApiDoc: {undocumented:?}"
    );
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );

    // And over HTTP, independently of how the router prints itself: each documented operation reaches a
    // handler (not the 404 of unknown paths, nor the 405 of a wrong method).
    for (path, method) in &documented {
        let uri = path
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    "6a0f6a0e-0000-4000-8000-000000000001"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let res = app
            .call(Method::from_bytes(method.as_bytes()).unwrap(), &uri, None)
            .await;
        assert!(
            res.status != StatusCode::METHOD_NOT_ALLOWED
                && !(res.status == StatusCode::NOT_FOUND
                    && res.body["description"] == "no such path in the OSB API"),
            "{method} {uri}: {} {}",
            res.status,
            res.text
        );
        // Each answer the handler gave is one the document lists for it.
        let operation = &document["paths"][path.as_str()][method.to_lowercase()];
        assert!(
            operation["responses"].get(res.status.as_str()).is_some(),
            "{method} {path} answered {} ({}), which its documentation does not list",
            res.status,
            res.text
        );
    }
}

/// `(path, method, operation)` of every documented operation under the documented prefixes.
fn operations(document: &Value) -> impl Iterator<Item = (&str, &str, &Value)> {
    document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter_map(move |method| Some((path.as_str(), *method, item.get(*method)?)))
        })
        .inspect(|(path, _, _)| {
            assert!(
                DOCUMENTED.iter().any(|p| path.starts_with(p)),
                "{path} is outside /v2 and /berth/v1"
            );
        })
}

/// `(path, METHOD)` of every route the router serves under the documented prefixes, read from its `Debug`
/// output (axum has no other way to list routes): each route's path and the methods of its `Allow` header.
fn served_routes(router: &axum::Router) -> BTreeSet<(String, String)> {
    let text = format!("{router:?}");
    // `paths: {RouteId(3): "/v2/catalog", ...}` names each route id's path.
    let paths = regex_pairs(&text, r#"RouteId\((\d+)\): "([^"]+)""#);
    // `RouteId(3): MethodRouter(MethodRouter { ... allow_header: Bytes(b"GET,HEAD") })` its methods.
    let methods = regex_pairs(
        &text,
        r#"RouteId\((\d+)\): MethodRouter\(MethodRouter \{.*?allow_header: Bytes\(b"([A-Z,]*)"\)"#,
    );
    let mut served = BTreeSet::new();
    for (id, path) in &paths {
        if !DOCUMENTED.iter().any(|p| path.starts_with(p)) {
            continue;
        }
        let allowed = methods
            .iter()
            .find(|(m, _)| m == id)
            .unwrap_or_else(|| panic!("no methods found for route {path}"));
        for method in allowed.1.split(',').filter(|m| *m != "HEAD") {
            served.insert((path.clone(), method.to_string()));
        }
    }
    served
}

fn regex_pairs(text: &str, pattern: &str) -> Vec<(String, String)> {
    regex::Regex::new(pattern)
        .unwrap()
        .captures_iter(text)
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect()
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("$ref", Value::String(reference)) => out.push(reference.clone()),
                    _ => collect_refs(item, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_refs(item, out)),
        _ => {}
    }
}

/// `value`, or what its `$ref` points to.
fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(reference) => document.pointer(reference.trim_start_matches('#')).unwrap(),
        None => value,
    }
}
