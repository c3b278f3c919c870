//! `GET /berth/v1/price-check`: the candidate ordering from the offers workers cache, behind basic auth.

use std::collections::BTreeMap;

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use broker::{db::ec2_offers, ec2::Offer};
use sqlx::PgPool;

use crate::helpers::TestApp;

fn offer(name: &str, vcpus: u32, gb: u64, spot: &[(&str, f64)], on_demand: f64) -> Offer {
    Offer {
        instance_type: name.into(),
        vcpus,
        memory_mib: gb * 1024,
        architectures: vec!["x86_64".into()],
        burstable: name.starts_with('t'),
        instance_storage_gb: 0,
        current_generation: true,
        spot_supported: true,
        spot_prices: spot
            .iter()
            .map(|(z, p)| (z.to_string(), *p))
            .collect::<BTreeMap<_, _>>(),
        on_demand_price: Some(on_demand),
    }
}

async fn cache(pool: &PgPool) {
    let offers = [
        offer(
            "m5.large",
            2,
            8,
            &[("eu-west-1a", 0.04), ("eu-west-1b", 0.03)],
            0.096,
        ),
        offer("c5.large", 2, 4, &[("eu-west-1a", 0.035)], 0.085),
        offer("r5.large", 2, 16, &[("eu-west-1a", 0.05)], 0.126),
        offer("t3.large", 2, 8, &[("eu-west-1a", 0.01)], 0.083),
    ];
    ec2_offers::replace_region(pool, "eu-west-1", &offers)
        .await
        .unwrap();
}

fn types(body: &serde_json::Value) -> Vec<&str> {
    body["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["instance_type"].as_str().unwrap())
        .collect()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn price_check_orders_cached_offers_like_the_worker(pool: PgPool) {
    cache(&pool).await;
    let app = TestApp::new(pool);
    // Basic auth, but no OSB version header needed.
    let unauthenticated = app
        .send(
            Request::get("/berth/v1/price-check")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    let get = |uri: &str| {
        Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header("authorization", TestApp::auth_header())
            .body(Body::empty())
            .unwrap()
    };

    let res = app
        .send(get("/berth/v1/price-check?selection_strategy=cheapest"))
        .await;
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
    assert_eq!(
        res.body["region"], "eu-west-1",
        "the only cached region is the default"
    );
    assert_eq!(
        types(&res.body),
        ["m5.large", "c5.large", "r5.large"],
        "spot, burstable left out"
    );
    assert_eq!(res.body["candidates"][0]["zone"], "eu-west-1b");
    assert!(res.body["prices_as_of"].is_string());

    let res = app.send(get("/berth/v1/price-check?region=eu-west-1&spot=false&selection_strategy=cheapest&max_price=0.1&allow_burstable=true")).await;
    assert_eq!(
        types(&res.body),
        ["t3.large", "c5.large", "m5.large"],
        "{res:?}"
    );
    let res = app
        .send(get(
            "/berth/v1/price-check?region=eu-west-1&ram_min=8&instance_types_to_avoid=m5.large&limit=1",
        ))
        .await;
    assert_eq!(types(&res.body), ["r5.large"]);
    assert_eq!(res.body["matching_types"], 1);

    // Refusals: an uncached region, a bad number, an unknown parameter, a contradiction.
    app.send(get("/berth/v1/price-check?region=us-east-2"))
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    app.send(get("/berth/v1/price-check?cpu_min=lots"))
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    app.send(get("/berth/v1/price-check?color=blue"))
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    app.send(get("/berth/v1/price-check?cpu_min=8&cpu_max=2"))
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn without_cached_offers_the_region_must_be_named(pool: PgPool) {
    let app = TestApp::new(pool);
    let res = app.call(Method::GET, "/berth/v1/price-check", None).await;
    let description = res.assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(description.contains("none yet"), "{description}");
}
