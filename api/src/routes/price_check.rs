//! `GET /berth/v1/price-check?region=...&cpu_min=...`: which instance types a dedicated `ec2` instance with these
//! parameters would get, cheapest-first or however `selection_strategy` orders them, without launching anything
//! (pg-spot-operator's `--check-price`). Same basic auth as `/v2`, no OSB version header (curl-friendly).
//!
//! The API never calls AWS: workers keep each region's instance types and prices in the broker database
//! (`ec2_offers`, refreshed when older than `EC2_OFFERS_TTL_SECS`), and the ordering is `broker::ec2`, the code
//! the worker launches by. So the answer is what a provision would try, as of the cached prices.

use axum::{Json, Router, extract::State, routing::get};
use broker::{
    db::ec2_offers,
    ec2::{Candidate, Requirements, Strategy, candidates},
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::{
    AppState,
    error::{ApiError, ApiResult, ErrorBody},
    extract::OsbQuery,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/berth/v1/price-check", get(price_check))
}

/// Query parameters that are numbers, flags or lists in the plan's parameters.
const NUMBERS: &[&str] = &[
    "cpu_min",
    "cpu_max",
    "ram_min",
    "ram_max",
    "storage_min",
    "max_price",
];
const LISTS: &[&str] = &["instance_types", "instance_types_to_avoid"];
const TEXTS: &[&str] = &[
    "selection_strategy",
    "instance_family",
    "cpu_arch",
    "storage_type",
    "zone",
];

/// The query as plan parameters (`instance_types=a,b` is a list; `spot` and `limit` are the check's own).
fn parameters(query: &[(String, String)]) -> ApiResult<Map<String, Value>> {
    let mut out = Map::new();
    for (key, value) in query {
        let key = key.as_str();
        let parsed = if NUMBERS.contains(&key) {
            let n: f64 = value
                .parse()
                .map_err(|_| ApiError::bad_request(format!("`{key}` must be a number")))?;
            if n < 0.0 {
                return Err(ApiError::bad_request(format!(
                    "`{key}` must not be negative"
                )));
            }
            json!(n)
        } else if LISTS.contains(&key) {
            json!(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
            )
        } else if TEXTS.contains(&key) {
            json!(value)
        } else if key == "allow_burstable" {
            json!(value == "true")
        } else if ["region", "spot", "limit"].contains(&key) {
            continue;
        } else {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{key}`"
            )));
        };
        out.insert(key.to_string(), parsed);
    }
    // Whole numbers where the requirements read integers.
    for key in ["cpu_min", "cpu_max", "storage_min"] {
        if let Some(n) = out.get(key).and_then(Value::as_f64) {
            out.insert(key.into(), json!(n as u64));
        }
    }
    Ok(out)
}

/// What a provision with these parameters would try, in order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PriceCheck {
    region: String,
    spot: bool,
    selection_strategy: Strategy,
    /// When the workers last refreshed the region's types and prices.
    prices_as_of: Option<DateTime<Utc>>,
    /// How many types match (`candidates` shows at most `limit` of them).
    matching_types: usize,
    candidates: Vec<Candidate>,
}

/// Which EC2 instance types a dedicated `ec2` instance with these parameters would get, in the order a provision
/// tries them, from the prices the workers cached (nothing is launched).
#[utoipa::path(
    get,
    path = "/berth/v1/price-check",
    tag = "dedicated servers",
    operation_id = "price_check",
    params(
        ("region" = Option<String>, Query, description = "The AWS region (required unless prices are cached for one region only)"),
        ("spot" = Option<bool>, Query, description = "Spot prices (the default) or on-demand (`false`)"),
        ("limit" = Option<u32>, Query, description = "How many candidates to show (10)"),
        ("cpu_min" = Option<f64>, Query, description = "As the plan parameter"),
        ("cpu_max" = Option<f64>, Query, description = "As the plan parameter"),
        ("ram_min" = Option<f64>, Query, description = "As the plan parameter (GB)"),
        ("ram_max" = Option<f64>, Query, description = "As the plan parameter (GB)"),
        ("storage_min" = Option<f64>, Query, description = "As the plan parameter (GB)"),
        ("max_price" = Option<f64>, Query, description = "As the plan parameter (USD per hour)"),
        ("instance_types" = Option<String>, Query, description = "Comma-separated"),
        ("instance_types_to_avoid" = Option<String>, Query, description = "Comma-separated"),
        ("selection_strategy" = Option<Strategy>, Query, description = "As the plan parameter"),
        ("instance_family" = Option<String>, Query, description = "As the plan parameter (a regular expression)"),
        ("cpu_arch" = Option<String>, Query, description = "As the plan parameter"),
        ("storage_type" = Option<String>, Query, description = "As the plan parameter"),
        ("zone" = Option<String>, Query, description = "As the plan parameter"),
        ("allow_burstable" = Option<bool>, Query, description = "As the plan parameter"),
    ),
    responses(
        (status = 200, description = "The candidates", body = PriceCheck),
        (status = 400, description = "A parameter that is malformed, unknown or out of range, or no region", body = ErrorBody),
        (status = 404, description = "No prices cached for the region", body = ErrorBody),
    )
)]
pub(crate) async fn price_check(
    State(state): State<AppState>,
    OsbQuery(query): OsbQuery<Vec<(String, String)>>,
) -> ApiResult<Json<PriceCheck>> {
    let get = |key: &str| {
        query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let spot = get("spot").is_none_or(|v| v != "false");
    let limit = match get("limit") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("`limit` must be a whole number"))?,
        None => 10,
    };
    let params = Value::Object(parameters(&query)?);
    let requirements =
        Requirements::from_parameters(&params, spot).map_err(ApiError::BadRequest)?;
    let cached = ec2_offers::regions(&state.db)
        .await
        .map_err(anyhow::Error::from)?;
    let region = match get("region") {
        Some(region) => region.to_string(),
        None if cached.len() == 1 => cached[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "the query parameter `region` is required (prices are cached for: {})",
                if cached.is_empty() {
                    "none yet".to_string()
                } else {
                    cached.join(", ")
                }
            )));
        }
    };
    if !cached.contains(&region) {
        return Err(ApiError::NotFound(format!(
            "no instance types or prices are cached for region {region:?}: workers cache AWS_REGION and the regions \
             instances are provisioned in"
        )));
    }
    let offers = ec2_offers::load_region(&state.db, &region)
        .await
        .map_err(anyhow::Error::from)?;
    let refreshed_at = ec2_offers::refreshed_at(&state.db, &region)
        .await
        .map_err(anyhow::Error::from)?;
    let ordered = candidates(&offers, &requirements, &[], &mut rand::thread_rng());
    Ok(Json(PriceCheck {
        region,
        spot,
        selection_strategy: requirements.strategy,
        prices_as_of: refreshed_at,
        matching_types: ordered.len(),
        candidates: ordered.into_iter().take(limit).collect(),
    }))
}
