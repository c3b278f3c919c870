//! Expiring bindings (OSB v2.17 `metadata.expires_at` / `renew_before`): the `expires_in` bind parameter, its
//! plan bounds (600..=7200 s, 10 unexpired expiring bindings per instance in the shipped catalog), the
//! metadata in bind and fetch bodies, and rotation from an expiring predecessor.

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

use crate::{
    assert_unchanged,
    helpers::{PG_SERVICE, PG_SHARED, T_SERVICE, T_SMALL, TestApp},
};

fn expiring(seconds: Value) -> Value {
    json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED, "parameters": {"expires_in": seconds}})
}

/// `expires_at` and `renew_before` of a binding row.
async fn stored_expiry(app: &TestApp, id: &str) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let row = sqlx::query("SELECT expires_at, renew_before FROM service_bindings WHERE id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    (row.get("expires_at"), row.get("renew_before"))
}

/// The spec's `yyyy-mm-ddThh:mm:ss.sZ`.
fn assert_osb_time(text: &Value) -> DateTime<Utc> {
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {text}"));
    let bytes = text.as_bytes();
    assert_eq!(bytes.len(), 22, "{text}");
    assert!(
        text.ends_with('Z') && bytes[10] == b'T' && bytes[19] == b'.',
        "{text}"
    );
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn expires_in_out_of_bounds_is_400_naming_it_and_writes_nothing(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    for bad in [
        json!(599),
        json!(7201),
        json!(0),
        json!(-5),
        json!(1800.5),
        json!("1800"),
        json!(null),
    ] {
        let d = assert_unchanged!(app, app.bind("i-1", "b-1", &expiring(bad.clone())).await)
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        assert!(d.contains("expires_in"), "{bad}: {d}");
    }
    // A plan without binding_expiry offers no expiring bindings.
    let body = json!({"service_id": T_SERVICE, "plan_id": T_SMALL, "organization_guid": "o", "space_guid": "s"});
    let op = app.provision("t-1", &body).await.operation();
    app.finish(&op, "succeeded", None).await;
    let body =
        json!({"service_id": T_SERVICE, "plan_id": T_SMALL, "parameters": {"expires_in": 1800}});
    let d = assert_unchanged!(app, app.bind("t-1", "tb-1", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("expires_in"), "{d}");
    // The bounds themselves are accepted.
    app.bind("i-1", "b-min", &expiring(json!(600)))
        .await
        .operation();
    app.bind("i-1", "b-max", &expiring(json!(7200)))
        .await
        .operation();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unexpired_expiring_bindings_per_instance_are_limited(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.provisioned("i-2").await;
    for n in 0..10 {
        app.bind("i-1", &format!("b-{n}"), &expiring(json!(900)))
            .await
            .operation();
    }
    let d = assert_unchanged!(app, app.bind("i-1", "b-10", &expiring(json!(900))).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("expires_in") && d.contains("10"), "{d}");
    // Repeating one of the ten is no new binding: 202 again.
    app.bind("i-1", "b-3", &expiring(json!(900)))
        .await
        .operation();
    // Bindings that never expire, and other instances, are not limited by it.
    let plain = json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED});
    app.bind("i-1", "forever", &plain).await.operation();
    app.bind("i-2", "c-0", &expiring(json!(900)))
        .await
        .operation();
    // Once one has expired, its place is free.
    sqlx::query(
        "UPDATE service_bindings SET expires_at = now() - interval '1 second' WHERE id = 'b-0'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    app.bind("i-1", "b-10", &expiring(json!(900)))
        .await
        .operation();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bind_and_fetch_bodies_carry_expires_at_and_renew_before(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let before = Utc::now();
    let res = app.bind("i-1", "b-1", &expiring(json!(3600))).await;
    let op = res.operation();
    assert!(
        res.body.get("metadata").is_none(),
        "a 202 carries no binding: {:?}",
        res.body
    );
    let (expires_at, renew_before) = stored_expiry(&app, "b-1").await;
    let (expires_at, renew_before) = (expires_at.unwrap(), renew_before.unwrap());
    let lifetime = (expires_at - before).num_seconds();
    assert!((3599..=3601).contains(&lifetime), "{lifetime}");
    assert_eq!(
        (expires_at - renew_before).num_seconds(),
        720,
        "the last fifth is left for renewal"
    );
    app.complete_bind(&op, "b-1", &json!({"DATABASE_URL": "postgres://u:p@h/d"}))
        .await;

    let fetched = app.fetch_binding("i-1", "b-1").await;
    assert_eq!(fetched.status, StatusCode::OK, "{fetched:?}");
    assert_eq!(
        assert_osb_time(&fetched.body["metadata"]["expires_at"]),
        expires_at
    );
    assert_eq!(
        assert_osb_time(&fetched.body["metadata"]["renew_before"]),
        renew_before
    );
    assert_eq!(
        fetched.body["credentials"]["DATABASE_URL"],
        "postgres://u:p@h/d"
    );
    // The same bind again, once it succeeded: 200 with the binding, metadata included.
    let again = app.bind("i-1", "b-1", &expiring(json!(3600))).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.body["metadata"], fetched.body["metadata"]);
    assert_eq!(again.body["credentials"], fetched.body["credentials"]);

    // A binding that does not expire has no metadata.
    let plain = json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED});
    let op = app.bind("i-1", "b-2", &plain).await.operation();
    app.complete_bind(&op, "b-2", &json!({"DATABASE_URL": "postgres://v:q@h/d"}))
        .await;
    let fetched = app.fetch_binding("i-1", "b-2").await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert!(fetched.body.get("metadata").is_none(), "{:?}", fetched.body);
    assert_eq!(stored_expiry(&app, "b-2").await, (None, None));
}

/// After expiry GET binding still answers 200 (the binding exists until the platform unbinds it), with its
/// `expires_at` in the past; a successor cannot name it (the spec asks for a non-expired predecessor); a failed
/// bind is not made again; unbinding it works.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_expired_binding_is_shown_refused_as_predecessor_and_unbound(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let op = app
        .bind("i-1", "old", &expiring(json!(600)))
        .await
        .operation();
    app.complete_bind(&op, "old", &json!({"DATABASE_URL": "postgres://u:p@h/d"}))
        .await;
    let failed = app
        .bind("i-1", "broken", &expiring(json!(600)))
        .await
        .operation();
    app.finish(&failed, "failed", Some("boom")).await;
    sqlx::query("UPDATE service_bindings SET expires_at = now() - interval '5 seconds', renew_before = now() - interval '10 seconds'")
        .execute(&app.pool)
        .await
        .unwrap();

    let fetched = app.fetch_binding("i-1", "old").await;
    assert_eq!(fetched.status, StatusCode::OK, "{fetched:?}");
    assert!(assert_osb_time(&fetched.body["metadata"]["expires_at"]) < Utc::now());

    let rotate =
        json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED, "predecessor_binding_id": "old"});
    let d = assert_unchanged!(app, app.bind("i-1", "new", &rotate).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(
        d.contains("predecessor_binding_id") && d.contains("expired"),
        "{d}"
    );

    let d = assert_unchanged!(app, app.bind("i-1", "broken", &expiring(json!(600))).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("expired"), "{d}");

    let unbind = app.unbind("i-1", "old").await.operation();
    app.complete_unbind(&unbind, "old").await;
    assert_eq!(
        app.fetch_binding("i-1", "old").await.status,
        StatusCode::NOT_FOUND
    );
}

/// A successor that brings no parameters takes its predecessor's, `expires_in` included: the same lifetime,
/// counted from its own bind. One that brings parameters without `expires_in` does not expire.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_successor_inherits_the_predecessors_lifetime(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let body = json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED,
                      "parameters": {"access": "read-only", "expires_in": 1200}});
    let op = app.bind("i-1", "old", &body).await.operation();
    app.complete_bind(&op, "old", &json!({"DATABASE_URL": "postgres://u:p@h/d"}))
        .await;
    // Make the predecessor older, so an inherited absolute time would show.
    sqlx::query("UPDATE service_bindings SET expires_at = expires_at - interval '900 seconds' WHERE id = 'old'")
        .execute(&app.pool)
        .await
        .unwrap();

    let before = Utc::now();
    let rotate =
        json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED, "predecessor_binding_id": "old"});
    app.bind("i-1", "new", &rotate).await.operation();
    assert_eq!(
        app.binding_parameters("new").await,
        json!({"access": "read-only", "expires_in": 1200})
    );
    let (expires_at, _) = stored_expiry(&app, "new").await;
    let lifetime = (expires_at.unwrap() - before).num_seconds();
    assert!((1199..=1201).contains(&lifetime), "{lifetime}");

    let mut own = rotate.clone();
    own["parameters"] = json!({"access": "read-write"});
    app.bind("i-1", "newer", &own).await.operation();
    assert_eq!(stored_expiry(&app, "newer").await, (None, None));
}
