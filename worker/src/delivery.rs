//! Connection delivery after every (re)creation of a dedicated server (`local` and `ec2` engines), besides
//! bindings, as pg-spot-operator does it: the connection JSON `{connstr, instance_name, ip_public, ip_private,
//! admin_user, admin_password, app_db_name}` pushed to a bucket key (`CONNSTR_BUCKET*`), and the operator's
//! setup-finished executable run with 4 arguments (instance name, private connection string, public one or "",
//! the instance's tags as JSON), killed after `SETUP_FINISHED_CALLBACK_TIMEOUT_SECS` (30). Failures are logged
//! and recorded in the instance's details (`delivery`); they never fail the instance, which works regardless.

use std::{path::Path, time::Duration};

use aws_sdk_s3::config::Region;
use broker::{
    config::Settings,
    db::{instances, instances::InstanceRow},
};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tracing::{info, warn};

use crate::{
    context::Services,
    providers::aws::{self, errors::describe},
};

/// What the bucket object holds (pg-spot-operator's format).
#[derive(Clone, Serialize)]
pub struct Connection {
    pub connstr: String,
    pub instance_name: String,
    pub ip_public: String,
    pub ip_private: String,
    pub admin_user: String,
    pub admin_password: String,
    pub app_db_name: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("instance_name", &self.instance_name)
            .finish_non_exhaustive()
    }
}

/// The name a person knows the instance by: the platform's `instance_name` in the OSB context, else its id.
pub fn instance_name(instance: &InstanceRow) -> String {
    instance
        .context
        .get("instance_name")
        .and_then(Value::as_str)
        .unwrap_or(&instance.id)
        .to_string()
}

fn connstr(user: &str, password: &str, host: &str, port: u64, database: &str) -> String {
    let mut url = url::Url::parse("postgresql://localhost/").expect("static URL");
    let _ = url.set_host(Some(host));
    let _ = url.set_port(Some(port as u16));
    let _ = url.set_username(user);
    let _ = url.set_password(Some(password));
    url.set_path(database);
    url.set_query(Some("sslmode=require"));
    url.into()
}

/// The connection of a provisioned dedicated server, from its details and secrets; `None` for other plans.
pub fn connection_of(
    instance: &InstanceRow,
    secrets: &Value,
) -> Option<(Connection, String, String)> {
    let d = &instance.details;
    let admin_user = d.get("admin_user")?.as_str()?.to_string();
    let app_db_name = d.get("app_db_name")?.as_str()?.to_string();
    let port = d.get("port")?.as_u64()?;
    let admin_password = secrets.get("admin_password")?.as_str()?.to_string();
    let ec2 = d.get("ec2");
    let field = |key: &str| {
        ec2.and_then(|e| e.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let host = d.get("host")?.as_str()?.to_string();
    let ip_private = field("ip_private").unwrap_or_else(|| host.clone());
    let ip_public = field("static_ip")
        .or_else(|| field("ip_public"))
        .unwrap_or_default();
    let private = connstr(
        &admin_user,
        &admin_password,
        &ip_private,
        port,
        &app_db_name,
    );
    let public = if ip_public.is_empty() {
        String::new()
    } else {
        connstr(&admin_user, &admin_password, &ip_public, port, &app_db_name)
    };
    let connection = Connection {
        connstr: if public.is_empty() {
            private.clone()
        } else {
            public.clone()
        },
        instance_name: instance_name(instance),
        ip_public,
        ip_private,
        admin_user,
        admin_password,
        app_db_name,
    };
    Some((connection, private, public))
}

/// Delivers the instance's connection (bucket push, callback) if anything is configured, and records how it
/// went in details `delivery`.
pub async fn after_creation(services: &Services, pool: &PgPool, instance_id: &str) {
    let settings = &services.settings;
    if settings.connstr_bucket.is_none() && settings.setup_finished_callback.is_none() {
        return;
    }
    let Ok(Some(instance)) = instances::get(pool, instance_id).await else {
        return;
    };
    let Some(secrets) = instance
        .secrets
        .as_ref()
        .and_then(|s| services.cipher.open_json::<Value>(s).ok())
    else {
        return;
    };
    let Some((connection, private, public)) = connection_of(&instance, &secrets) else {
        return;
    };
    let mut errors = Vec::new();
    if let Some(bucket) = &settings.connstr_bucket
        && let Err(e) = push(settings, bucket, &instance.id, &connection).await
    {
        errors.push(format!("connstr push: {e:#}"));
    }
    if let Some(program) = &settings.setup_finished_callback {
        let tags = instance
            .parameters
            .get("tags")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let limit = Duration::from_secs(settings.setup_finished_callback_timeout_secs);
        let args = [
            connection.instance_name.clone(),
            private,
            public,
            tags.to_string(),
        ];
        if let Err(e) = run_callback(program, &args, limit).await {
            errors.push(format!("setup-finished callback: {e:#}"));
        }
    }
    for error in &errors {
        warn!(instance_id, error, "connection delivery failed");
    }
    if errors.is_empty() {
        info!(instance_id, "connection delivered");
    }
    let record = json!({ "delivery": { "at": chrono::Utc::now(), "errors": errors } });
    if let Err(e) = instances::merge_details(pool, instance_id, &record).await {
        warn!(instance_id, error = %e, "recording the delivery failed");
    }
}

/// The object key: `CONNSTR_BUCKET_KEY` with `{instance_id}` and `{instance_name}` filled in.
pub fn object_key(template: &str, instance_id: &str, instance_name: &str) -> String {
    template
        .replace("{instance_id}", instance_id)
        .replace("{instance_name}", instance_name)
}

async fn push(
    settings: &Settings,
    bucket: &str,
    instance_id: &str,
    connection: &Connection,
) -> anyhow::Result<()> {
    let region = settings
        .connstr_bucket_region
        .clone()
        .or_else(|| settings.aws_region.clone())
        .unwrap_or_else(|| "us-east-1".into());
    let mut config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .http_client(aws::http_client())
        .region(Region::new(region.clone()));
    match (
        &settings.connstr_bucket_access_key,
        &settings.connstr_bucket_access_secret,
    ) {
        (Some(key), Some(secret)) => {
            config = config.credentials_provider(aws::static_credentials(key, secret, None))
        }
        _ => {
            let sdk = aws::sdk_config(settings, &region)?;
            config = aws_sdk_s3::config::Builder::from(&sdk).http_client(aws::http_client());
        }
    }
    if let Some(endpoint) = &settings.connstr_bucket_endpoint {
        config = config.endpoint_url(endpoint).force_path_style(true);
    }
    let client = aws_sdk_s3::Client::from_conf(config.build());
    let key = object_key(
        &settings.connstr_bucket_key,
        instance_id,
        &connection.instance_name,
    );
    let body = serde_json::to_vec_pretty(connection)?;
    client
        .put_object()
        .bucket(bucket)
        .key(&key)
        .content_type("application/json")
        .body(body.into())
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("putting s3://{bucket}/{key}: {}", describe(&e)))?;
    Ok(())
}

/// Runs `program` with `args` in a process group of its own; after `limit` the whole group is killed.
pub async fn run_callback(program: &Path, args: &[String], limit: Duration) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {}: {e}", program.display()))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => {
            let status = status?;
            anyhow::ensure!(
                status.success(),
                "{} exited with {status}",
                program.display()
            );
            Ok(())
        }
        Err(_) => {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status()
                    .await;
            }
            let _ = child.kill().await;
            anyhow::bail!(
                "{} ran longer than {} s and was killed",
                program.display(),
                limit.as_secs()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fill_in_the_instance() {
        assert_eq!(
            object_key("berth/{instance_id}/{instance_name}.json", "i1", "pg1"),
            "berth/i1/pg1.json"
        );
    }

    #[test]
    fn the_callback_limit_defaults_to_30_seconds() {
        let settings: Settings = serde_json::from_value(json!({})).unwrap();
        assert_eq!(settings.setup_finished_callback_timeout_secs, 30);
        assert_eq!(broker::config::DEFAULT_CALLBACK_SECS, 30);
    }
}
