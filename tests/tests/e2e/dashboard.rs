//! The dashboard in a real browser (headless Chromium through chromedriver): an instance of each local plan
//! (`shared`, `dedicated`, `ha`) and an `s3` `basic` bucket on SeaweedFS, each opened with the `dashboard_url`
//! the broker answered, asserted on the rendered DOM and kept as a screenshot (under the target folder, printed);
//! a link whose expiry or signature was changed, an expired link and the link of a deprovisioned instance are
//! refused; and no secret (binding credentials, the instances' sealed secrets, a webhook secret, the broker's
//! credentials and database URL, the store's keys) appears anywhere in any page.

use std::{path::PathBuf, time::Duration};

use berth_tests::{Stack, WebhookReceiver, bin_dir, browser::Browser, plan_ids};
use broker::crypto::Cipher;
use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const WAIT: Duration = Duration::from_secs(240);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run ./scripts/test.sh, which starts SeaweedFS and sets it")
    })
}

/// Where the screenshots go: `<target dir>/e2e-artifacts/dashboard/`.
fn artifacts() -> PathBuf {
    bin_dir()
        .parent()
        .expect("target/<profile>")
        .join("e2e-artifacts")
        .join("dashboard")
}

struct Provisioned {
    plan: &'static str,
    instance: String,
    ids: (String, String),
    /// The `dashboard_url` of the 202.
    accepted_url: String,
}

async fn provision(
    stack: &Stack,
    service: &str,
    plan: &'static str,
    parameters: Value,
) -> Provisioned {
    let ids = plan_ids(&stack.catalog().await.unwrap(), service, plan);
    let instance = format!(
        "dash-{plan}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let (status, body) = stack
        .send(
            stack
                .request(
                    Method::PUT,
                    &format!("/v2/service_instances/{instance}?accepts_incomplete=true"),
                )
                .json(&json!({
                    "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org-dash",
                    "space_guid": "space-dash", "parameters": parameters,
                })),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let accepted_url = body["dashboard_url"]
        .as_str()
        .unwrap_or_else(|| panic!("the 202 of a provision carries a dashboard_url: {body}"))
        .to_string();
    assert!(
        accepted_url.starts_with(&format!(
            "{}/dashboard/instances/{instance}?expires=",
            stack.base_url
        )),
        "{accepted_url}"
    );
    Provisioned {
        plan,
        instance,
        ids,
        accepted_url,
    }
}

/// Every string value in a JSON document (the secrets a page must not show).
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// The credentials of a binding that are secrets: passwords, keys and the URLs that carry them (its host,
/// database and bucket names are on the page by design).
fn secret_credentials(credentials: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (key, value) in credentials.as_object().into_iter().flatten() {
        let upper = key.to_ascii_uppercase();
        if ["PASSWORD", "SECRET", "ACCESS_KEY"]
            .iter()
            .any(|k| upper.contains(k))
            || upper.ends_with("_URL")
            || upper == "URI"
        {
            strings(value, &mut out);
        }
    }
    assert!(
        !out.is_empty(),
        "a binding has secret credentials: {credentials}"
    );
    out
}

/// The instance's sealed secrets (admin and replication passwords), opened with the stack's key.
async fn sealed_secrets(db: &mut PgConnection, cipher: &Cipher, instance: &str) -> Vec<String> {
    let sealed: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT secrets FROM service_instances WHERE id = $1")
            .bind(instance)
            .fetch_one(&mut *db)
            .await
            .unwrap();
    let mut out = Vec::new();
    if let Some(sealed) = sealed {
        strings(&cipher.open_json::<Value>(&sealed).unwrap(), &mut out);
    }
    out
}

async fn created_at(db: &mut PgConnection, instance: &str) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT created_at FROM service_instances WHERE id = $1")
        .bind(instance)
        .fetch_one(&mut *db)
        .await
        .unwrap()
}

/// GET of a dashboard link without credentials: status and HTML.
async fn get_page(url: &str) -> (u16, String, Option<String>) {
    let answer = reqwest::get(url).await.unwrap();
    let status = answer.status().as_u16();
    let content_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, answer.text().await.unwrap(), content_type)
}

fn assert_no_secret(html: &str, secrets: &[String], page: &str) {
    for secret in secrets.iter().filter(|s| s.len() >= 6) {
        assert!(
            !html.contains(secret.as_str()),
            "a secret ({}…) appears in {page}",
            &secret[..3]
        );
    }
}

#[tokio::test]
async fn instance_pages_in_a_browser_show_each_plan_refuse_bad_links_and_no_secret() {
    let seaweed = env("BERTH_TEST_S3_COMPAT_URL");
    let store_secret = env("BERTH_TEST_S3_COMPAT_SECRET_KEY");
    let stack = Stack::start_with(vec![
        ("S3_COMPATIBLE_ENDPOINT", seaweed.clone()),
        ("S3_COMPATIBLE_IAM_ENDPOINT", seaweed.clone()),
        (
            "S3_COMPATIBLE_ACCESS_KEY",
            env("BERTH_TEST_S3_COMPAT_ACCESS_KEY"),
        ),
        ("S3_COMPATIBLE_SECRET_KEY", store_secret.clone()),
    ])
    .await
    .unwrap();
    let hooks = WebhookReceiver::start().await.unwrap();
    let webhook_secret = "dashboard-webhook-secret-e2e";

    // One instance of each plan, provisioned together; each 202 carries its dashboard_url.
    let shared = provision(
        &stack,
        "postgres",
        "shared",
        json!({"webhook": {"url": hooks.url, "secret": webhook_secret}}),
    )
    .await;
    let dedicated = provision(&stack, "postgres", "dedicated", json!({})).await;
    let ha = provision(&stack, "postgres", "ha", json!({"members": 3})).await;
    let bucket = provision(&stack, "s3", "basic", json!({})).await;
    let all = [&shared, &dedicated, &ha, &bucket];
    for p in all {
        stack
            .wait_succeeded(&format!("/v2/service_instances/{}", p.instance), WAIT)
            .await;
    }

    // A binding on each (its credentials are secrets the pages must not show), two backups of the shared
    // database (the backup sizes chart).
    let mut secrets = vec![
        webhook_secret.to_string(),
        stack.password.clone(),
        stack.broker_db_url.clone(),
        store_secret,
    ];
    let cipher = Cipher::from_key_file(&stack.dir.join("master.key")).unwrap();
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    for p in all {
        let binding = format!(
            "/v2/service_instances/{}/service_bindings/app-{}",
            p.instance, p.plan
        );
        let bind = json!({"service_id": p.ids.0, "plan_id": p.ids.1, "app_guid": "app-dash"});
        stack.put_until_done(&binding, &bind, WAIT).await;
        secrets.extend(secret_credentials(&stack.fetch_credentials(&binding).await));
        secrets.extend(sealed_secrets(&mut db, &cipher, &p.instance).await);
    }
    for _ in 0..2 {
        let (status, body) = stack
            .send(stack.request(
                Method::POST,
                &format!("/berth/v1/instances/{}/backups", shared.instance),
            ))
            .await
            .unwrap();
        assert_eq!(status, 202, "{body}");
        stack.assert_task_succeeded(&body, WAIT).await;
    }

    let browser = Browser::start().await.unwrap();
    let shots = artifacts();
    for p in all {
        // GET instance answers a fresh link too; both open the page.
        let (status, fetched) = stack
            .send(stack.request(
                Method::GET,
                &format!("/v2/service_instances/{}", p.instance),
            ))
            .await
            .unwrap();
        assert_eq!(status, 200, "{fetched}");
        let url = fetched["dashboard_url"]
            .as_str()
            .expect("GET instance carries a dashboard_url");
        let (status, html, content_type) = get_page(url).await;
        assert_eq!(status, 200, "{html}");
        assert_eq!(content_type.as_deref(), Some("text/html; charset=utf-8"));
        assert_no_secret(&html, &secrets, &format!("the {} page", p.plan));

        browser.goto(&p.accepted_url).await.unwrap();
        assert!(browser.title().await.unwrap().contains(&p.instance));
        assert_eq!(browser.text("#instance-plan").await.unwrap(), p.plan);
        assert_eq!(browser.text("#instance-state").await.unwrap(), "ready");
        let bindings = browser.texts("tr.binding").await.unwrap();
        assert_eq!(bindings.len(), 1, "{bindings:?}");
        assert!(
            bindings[0].contains(&format!("app-{}", p.plan)),
            "{bindings:?}"
        );
        let operations = browser.texts("tr.operation").await.unwrap();
        assert!(
            operations
                .iter()
                .any(|o| o.starts_with("provision") && o.contains("succeeded")),
            "{operations:?}"
        );
        assert!(
            !browser
                .texts("#operation-durations rect")
                .await
                .unwrap()
                .is_empty()
        );
        // The audit trail: the provision and the bind, each with how it ended.
        let events = browser.texts("tr.event").await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.contains("provision") && e.contains("succeeded")),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| e.contains("bind (binding") && e.contains("succeeded")),
            "{events:?}"
        );
        let rendered = browser.source().await.unwrap();
        assert_no_secret(
            &rendered,
            &secrets,
            &format!("the rendered {} page", p.plan),
        );
        let shot = shots.join(format!("{}.png", p.plan));
        browser.screenshot(&shot).await.unwrap();
        println!("dashboard screenshot: {}", shot.display());
    }

    // By plan: connection, the engine's own section.
    browser.goto(&shared.accepted_url).await.unwrap();
    assert!(browser.text("#connection").await.unwrap().contains("port"));
    let snapshots = browser.texts("tr.snapshot").await.unwrap();
    assert_eq!(snapshots.len(), 2, "{snapshots:?}");
    assert!(
        snapshots
            .iter()
            .all(|s| s.starts_with("backup") && s.contains("ready")),
        "{snapshots:?}"
    );
    assert_eq!(
        browser.texts("#backup-sizes circle").await.unwrap().len(),
        2
    );

    browser.goto(&dedicated.accepted_url).await.unwrap();
    let server = browser.text("#server").await.unwrap();
    assert!(
        server.contains("PostgreSQL") && server.contains("restarts"),
        "{server}"
    );
    assert_eq!(browser.text("#instance-engine").await.unwrap(), "local");

    browser.goto(&ha.accepted_url).await.unwrap();
    let members = browser.texts("tr.member").await.unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    let roles = browser.texts("td.member-role").await.unwrap();
    assert_eq!(
        roles.iter().filter(|r| *r == "leader").count(),
        1,
        "{roles:?}"
    );
    assert!(
        members
            .iter()
            .all(|m| m.contains("running") || m.contains("streaming")),
        "{members:?}"
    );

    browser.goto(&bucket.accepted_url).await.unwrap();
    let details = stack.instance_details(&bucket.instance).await;
    let server = browser.text("#server").await.unwrap();
    assert!(server.starts_with("Bucket"), "{server}");
    assert!(
        server.contains(details["bucket"].as_str().unwrap()),
        "{server}"
    );

    // Refused: an expiry or signature changed by hand, an expired link signed with the broker's key.
    let (base, _) = shared.accepted_url.split_once("?expires=").unwrap();
    let query = broker::dashboard_link::sign(
        &cipher,
        &shared.instance,
        created_at(&mut db, &shared.instance).await,
        Utc::now().timestamp() + 600,
    );
    let good = format!("{base}?expires={}&sig={}", query.expires, query.sig);
    assert_eq!(get_page(&good).await.0, 200);
    let longer = format!("{base}?expires={}&sig={}", query.expires + 1, query.sig);
    let mut flipped = query.sig.clone();
    let last = if flipped.ends_with('A') { "B" } else { "A" };
    flipped.replace_range(flipped.len() - 1.., last);
    let resigned = format!("{base}?expires={}&sig={flipped}", query.expires);
    let unsigned = base.to_string();
    for tampered in [&longer, &resigned, &unsigned] {
        let (status, html, _) = get_page(tampered).await;
        assert_eq!(status, 403, "{tampered}: {html}");
        browser.goto(tampered).await.unwrap();
        assert_eq!(
            browser.text("#refused h2").await.unwrap(),
            "This link is not valid"
        );
    }
    let past = broker::dashboard_link::sign(
        &cipher,
        &shared.instance,
        created_at(&mut db, &shared.instance).await,
        Utc::now().timestamp() - 60,
    );
    let expired = format!("{base}?expires={}&sig={}", past.expires, past.sig);
    let (status, html, _) = get_page(&expired).await;
    assert_eq!(status, 403, "{html}");
    browser.goto(&expired).await.unwrap();
    assert_eq!(
        browser.text("#refused h2").await.unwrap(),
        "This link has expired"
    );
    browser
        .screenshot(&shots.join("expired.png"))
        .await
        .unwrap();

    // The operator overview: behind the broker's credentials, instances per plan and state, the queue.
    let (status, _, _) = get_page(&format!("{}/berth/v1/dashboard", stack.base_url)).await;
    assert_eq!(status, 401);
    let answer = stack
        .request(Method::GET, "/berth/v1/dashboard")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let overview = answer.text().await.unwrap();
    for expected in [
        "Instances per plan and state (4)",
        "Queue by kind",
        "Recent failures",
    ] {
        assert!(
            overview.contains(expected),
            "{expected} missing from the overview"
        );
    }
    for plan in ["shared", "dedicated", "ha", "basic"] {
        assert!(
            overview.contains(&format!("<td>{plan}</td>")),
            "{plan} missing from the overview"
        );
    }
    assert_no_secret(&overview, &secrets, "the operator overview");

    // Deprovisioned: the link goes with the instance.
    let instance_path = format!("/v2/service_instances/{}", shared.instance);
    let binding = format!("{instance_path}/service_bindings/app-shared");
    stack.delete_until_done(&binding, &shared.ids, WAIT).await;
    let (status, _) = stack
        .delete_until_done(&instance_path, &shared.ids, WAIT)
        .await;
    assert_eq!(status, 410);
    let (status, html, _) = get_page(&good).await;
    assert_eq!(status, 410, "{html}");
    browser.goto(&good).await.unwrap();
    assert_eq!(
        browser.text("#refused h2").await.unwrap(),
        "This instance is gone"
    );

    browser.close().await;
    db.close().await.unwrap();
    for p in [&dedicated, &ha, &bucket] {
        let path = format!("/v2/service_instances/{}", p.instance);
        stack
            .delete_until_done(
                &format!("{path}/service_bindings/app-{}", p.plan),
                &p.ids,
                WAIT,
            )
            .await;
        stack.delete_until_done(&path, &p.ids, WAIT).await;
    }
    stack.stop().await;
}
