//! `webhook.deliver`: POSTs a delivery's body, signed with `X-OSB-Signature: base64(HMAC-SHA256(secret,
//! body))`. 2xx is delivered; anything else is retried with backoff, and the last attempt marks the
//! delivery failed. Error messages never carry the URL (it may hold a token). The target is checked against
//! the webhook policy after DNS resolution and the connection pinned to the checked addresses; a refused
//! target fails the delivery at once.

use anyhow::Context as _;
use async_trait::async_trait;
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use broker::{
    crypto,
    db::webhooks::{self, DeliveryState},
    model::kinds,
    webhook_target::{Refused, TargetPolicy},
};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
};

pub struct DeliverWebhook;

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "X-OSB-Signature";

#[derive(Debug, Deserialize)]
struct Payload {
    delivery_id: Uuid,
}

#[async_trait]
impl TaskHandler for DeliverWebhook {
    fn kind(&self) -> &'static str {
        kinds::DELIVER_WEBHOOK
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let Payload { delivery_id } = ctx.payload()?;
        let delivery = webhooks::get(ctx.pool, delivery_id)
            .await
            .context("reading the webhook delivery")?
            .ok_or_else(|| {
                TaskError::fatal(format!("webhook delivery {delivery_id} does not exist"))
            })?;
        if delivery.state != DeliveryState::Pending {
            return Ok(Step::Done);
        }
        let secret = ctx
            .services
            .cipher
            .open(&delivery.secret)
            .map_err(|e| TaskError::Fatal(e.context("opening the webhook secret")))?;
        let body = serde_json::to_vec(&delivery.body).context("serializing the webhook body")?;
        let signature = crypto::sign(&secret, &body);

        let client = match pinned_client(&ctx.services.webhook_targets, &delivery.url).await {
            Ok(client) => client,
            Err(Unreachable::Refused(refused)) => {
                // The policy will not change its mind on a retry: the delivery fails now, saying why.
                let error = refused.to_string();
                webhooks::record_attempt(
                    ctx.pool,
                    delivery_id,
                    DeliveryState::Failed,
                    None,
                    Some(&error),
                )
                .await
                .context("recording the refused webhook")?;
                return Err(TaskError::fatal(error));
            }
            Err(Unreachable::Lookup(error)) => {
                return attempt_failed(ctx, delivery_id, None, error).await;
            }
        };
        let sent = client
            .post(&delivery.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        let (status, error) = match sent {
            Ok(response) if response.status().is_success() => {
                let status = i32::from(response.status().as_u16());
                webhooks::record_attempt(
                    ctx.pool,
                    delivery_id,
                    DeliveryState::Delivered,
                    Some(status),
                    None,
                )
                .await
                .context("recording the webhook delivery")?;
                return Ok(Step::Done);
            }
            Ok(response) => {
                let status = response.status();
                (
                    Some(i32::from(status.as_u16())),
                    format!("the webhook answered HTTP {status}"),
                )
            }
            Err(e) => (
                None,
                format!("calling the webhook failed: {}", e.without_url()),
            ),
        };
        attempt_failed(ctx, delivery_id, status, error).await
    }
}

/// Records a failed attempt: retried with backoff, the last one marks the delivery failed.
async fn attempt_failed(
    ctx: &TaskContext<'_>,
    delivery_id: Uuid,
    status: Option<i32>,
    error: String,
) -> Result<Step, TaskError> {
    let last = ctx.task.attempts_spent() >= ctx.task.max_attempts;
    metrics::counter!(
        broker::telemetry::names::WEBHOOK_FAILURES,
        "final" => if last { "true" } else { "false" },
    )
    .increment(1);
    webhooks::record_attempt(
        ctx.pool,
        delivery_id,
        if last {
            DeliveryState::Failed
        } else {
            DeliveryState::Pending
        },
        status,
        Some(&error),
    )
    .await
    .context("recording the webhook attempt")?;
    Err(TaskError::retryable(error))
}

enum Unreachable {
    /// The policy refuses the target (final).
    Refused(Refused),
    /// The URL or its host name could not be resolved (worth a retry); never names the URL.
    Lookup(String),
}

/// A client for one delivery: the URL's host resolved once, every address checked against the policy, and
/// the connection pinned to those addresses (a second DNS answer cannot swap in another). No redirects (a
/// 3xx counts as a failed attempt) and no proxy, so nothing else picks where the request goes.
async fn pinned_client(policy: &TargetPolicy, url: &str) -> Result<reqwest::Client, Unreachable> {
    let parsed = url::Url::parse(url)
        .map_err(|e| Unreachable::Lookup(format!("the webhook URL is invalid: {e}")))?;
    let (Some(host), Some(port)) = (parsed.host(), parsed.port_or_known_default()) else {
        return Err(Unreachable::Lookup(
            "the webhook URL has no host or port".into(),
        ));
    };
    let addresses: Vec<SocketAddr> = match host {
        url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
        url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        url::Host::Domain(name) => tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| Unreachable::Lookup(format!("resolving the webhook host {name}: {e}")))?
            .collect(),
    };
    let ips: Vec<IpAddr> = addresses.iter().map(SocketAddr::ip).collect();
    policy
        .check_resolved(&host, &ips)
        .map_err(Unreachable::Refused)?;
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("berth-worker/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let url::Host::Domain(name) = host {
        builder = builder.resolve_to_addrs(name, &addresses);
    }
    builder
        .build()
        .map_err(|e| Unreachable::Lookup(format!("building the webhook client: {e}")))
}
