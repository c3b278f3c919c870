//! The `s3` service through the real binaries, on moto (the `aws` engine through the SDK's standard chain:
//! plain AWS_* variables) and SeaweedFS (the `s3-compatible` engine): the catalog shows it only when a store
//! is configured; provision, a plan change S3 cannot make (422), bind, unbind, deprovision.

use std::time::Duration;

use berth_tests::{Stack, find_service, plan_ids};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

pub(crate) fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run ./scripts/test.sh, which starts moto and SeaweedFS and sets it"
        )
    })
}

async fn lifecycle(stack: &Stack, endpoint: &str) {
    let catalog = stack.catalog().await.unwrap();
    let s3 = find_service(&catalog, "s3").expect("the s3 service is in the catalog");
    let (service, plans) = (s3["id"].as_str().unwrap().to_string(), &s3["plans"]);
    let names: Vec<&str> = plans
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["basic", "versioned", "encrypted", "encrypted-versioned"]
    );
    assert!(
        !catalog.to_string().contains("one_way_features"),
        "berth's own fields stay private"
    );
    for plan in plans.as_array().unwrap() {
        assert_eq!(
            plan["metadata"]["credentials"], "per-binding",
            "the catalog says which credentials bindings get: {plan}"
        );
    }
    let (_, versioned) = plan_ids(&catalog, "s3", "versioned");
    let (_, basic) = plan_ids(&catalog, "s3", "basic");

    let instance = uuid::Uuid::new_v4().to_string();
    let path = format!("/v2/service_instances/{instance}");
    let provision = json!({
        "service_id": service, "plan_id": versioned, "organization_guid": "org", "space_guid": "space",
        "parameters": { "tags": { "team": "e2e" } },
    });
    stack.put_until_done(&path, &provision, WAIT).await;

    // versioned -> basic: S3 cannot turn versioning off, so the API refuses it at once.
    let (status, body) = stack
        .send(
            stack
                .request(Method::PATCH, &format!("{path}?accepts_incomplete=true"))
                .json(&json!({ "service_id": service, "plan_id": basic })),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(
        body["description"].as_str().unwrap().contains("versioning"),
        "{body}"
    );

    let binding = format!("{path}/service_bindings/app-1");
    let bind = json!({
        "service_id": service, "plan_id": versioned, "parameters": { "access": "read-only" },
    });
    stack.put_until_done(&binding, &bind, WAIT).await;
    let creds = &stack.fetch_credentials(&binding).await;
    for key in [
        "S3_BUCKET",
        "S3_LOCATION",
        "S3_ACCESS_KEY",
        "S3_SECRET_KEY",
        "S3_REGION",
        "S3_ENDPOINT",
        "uri",
    ] {
        assert!(creds[key].is_string(), "{key} missing");
    }
    assert_eq!(creds["S3_ENDPOINT"], json!(endpoint));
    assert!(
        creds["S3_BUCKET"]
            .as_str()
            .unwrap()
            .starts_with(&stack.name_prefix.replace('_', "-"))
    );
    let secret = creds["S3_SECRET_KEY"].as_str().unwrap();
    assert!(!stack.logs().contains(secret), "a secret key reached a log");

    // The Akkeris action: the binding gets a new key, stored in place of the old one.
    let (status, body) = stack
        .send(stack.request(Method::PUT, &format!("{path}/actions/credentials")))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    stack.wait_succeeded(&path, WAIT).await;
    let (_, rotated) = stack
        .send(stack.request(Method::GET, &binding))
        .await
        .unwrap();
    assert!(
        rotated["credentials"]["S3_ACCESS_KEY"].is_string(),
        "{rotated}"
    );
    assert_ne!(
        rotated["credentials"]["S3_ACCESS_KEY"], creds["S3_ACCESS_KEY"],
        "the rotation stored a new key"
    );
    let new_secret = rotated["credentials"]["S3_SECRET_KEY"].as_str().unwrap();
    assert!(
        !stack.logs().contains(new_secret),
        "a secret key reached a log"
    );

    let ids = (service, versioned);
    let (status, _) = stack.delete_until_done(&binding, &ids, WAIT).await;
    assert!(status == 410 || status == 200);
    let (status, last) = stack.delete_until_done(&path, &ids, WAIT).await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
}

#[tokio::test]
async fn s3_on_moto_through_the_aws_chain() {
    let url = env("BERTH_TEST_MOTO_URL");
    let stack = Stack::start_with(vec![
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", url.clone()),
        ("AWS_ACCESS_KEY_ID", env("BERTH_TEST_MOTO_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY", env("BERTH_TEST_MOTO_SECRET_KEY")),
    ])
    .await
    .unwrap();
    lifecycle(&stack, &url).await;
    stack.stop().await;
}

#[tokio::test]
async fn s3_compatible_on_seaweedfs() {
    let url = env("BERTH_TEST_S3_COMPAT_URL");
    let stack = Stack::start_with(vec![
        ("S3_COMPATIBLE_ENDPOINT", url.clone()),
        ("S3_COMPATIBLE_IAM_ENDPOINT", url.clone()),
        (
            "S3_COMPATIBLE_ACCESS_KEY",
            env("BERTH_TEST_S3_COMPAT_ACCESS_KEY"),
        ),
        (
            "S3_COMPATIBLE_SECRET_KEY",
            env("BERTH_TEST_S3_COMPAT_SECRET_KEY"),
        ),
    ])
    .await
    .unwrap();
    lifecycle(&stack, &url).await;
    stack.stop().await;
}

#[tokio::test]
async fn no_s3_store_means_no_s3_service() {
    if ["AWS_REGION", "S3_COMPATIBLE_ENDPOINT"]
        .iter()
        .any(|v| std::env::var(v).is_ok())
    {
        panic!("this test needs an environment without AWS_REGION and S3_COMPATIBLE_ENDPOINT");
    }
    let stack = Stack::start().await.unwrap();
    let catalog = stack.catalog().await.unwrap();
    assert!(find_service(&catalog, "s3").is_none(), "{catalog}");
    stack.stop().await;
}
