//! `webhook.deliver`: POSTs a delivery's body, signed with `X-OSB-Signature: base64(HMAC-SHA256(secret,
//! body))`. 2xx is delivered; anything else is retried with backoff, and the last attempt marks the
//! delivery failed. Error messages never carry the URL (it may hold a token).

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{crypto, db::webhooks, model::kinds};
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
        if delivery.state != "pending" {
            return Ok(Step::Done);
        }
        let secret = ctx
            .services
            .cipher
            .open(&delivery.secret)
            .map_err(|e| TaskError::Fatal(e.context("opening the webhook secret")))?;
        let body = serde_json::to_vec(&delivery.body).context("serializing the webhook body")?;
        let signature = crypto::sign(&secret, &body);

        let sent = ctx
            .services
            .http
            .post(&delivery.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        let (status, error) = match sent {
            Ok(response) if response.status().is_success() => {
                let status = i32::from(response.status().as_u16());
                webhooks::record_attempt(ctx.pool, delivery_id, "delivered", Some(status), None)
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
        let last = ctx.task.attempts >= ctx.task.max_attempts;
        webhooks::record_attempt(
            ctx.pool,
            delivery_id,
            if last { "failed" } else { "pending" },
            status,
            Some(&error),
        )
        .await
        .context("recording the webhook attempt")?;
        Err(TaskError::retryable(error))
    }
}
