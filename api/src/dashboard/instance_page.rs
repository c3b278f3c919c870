//! What an instance's page shows, read from the broker's database: never from a sealed column, and from the
//! instance's details only the fields named in [`SERVER_FIELDS`] (details hold names and addresses, but a
//! field added there later should not reach a page anyone with the link can read without someone choosing so).

use broker::{
    catalog::Catalog,
    db::{
        bindings::{self, BindingRow},
        dashboard::{self, InstanceSnapshot},
        events,
        instances::InstanceRow,
        snapshots::SnapshotState,
        tasks::TaskRow,
    },
    model::{Operation, TaskState},
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;

use super::{
    charts::{self, BarChart, LineChart, Run},
    text,
};

/// How many of the instance's newest tasks the page reads (the history and the chart).
const TASKS_SHOWN: i64 = 50;
/// The newest audit events the page lists (the rest: `/berth/v1/instances/{id}/events`).
const EVENTS_SHOWN: i64 = 50;
/// How many snapshots (backups and preset versions) it lists.
const SNAPSHOTS_SHOWN: i64 = 100;

/// The instance details shown as "the server", in this order, with their labels. Scalars only.
const SERVER_FIELDS: &[(&str, &str)] = &[
    ("postgres_version", "PostgreSQL"),
    ("tuning_profile", "tuning profile"),
    ("tls", "TLS"),
    ("database", "database"),
    ("app_db_name", "app database"),
    ("owner_role", "owner role"),
    ("admin_user", "admin user"),
    ("engine_host", "worker host"),
    ("scope", "cluster scope"),
    ("primary", "primary"),
    ("synchronous", "synchronous replication"),
    ("etcd_port", "etcd port"),
    ("restarts", "restarts"),
    ("recoveries", "recoveries"),
    ("last_recovered_at", "last recovered"),
    ("ready_at", "ready since"),
    ("bucket", "bucket"),
    ("region", "region"),
    ("endpoint", "endpoint"),
    ("versioning", "versioning"),
    ("encryption", "encryption"),
    ("per_binding_credentials", "a key per binding"),
];

/// The fields of an `ec2` engine's VM record shown, with their labels.
const VM_FIELDS: &[(&str, &str)] = &[
    ("instance_type", "instance type"),
    ("zone", "zone"),
    ("region", "region"),
    ("vm_id", "VM"),
    ("ip_public", "public IP"),
    ("ip_private", "private IP"),
    ("generation", "VMs launched by recoveries"),
    ("recovering", "recovering now"),
];

#[derive(Debug, Serialize)]
pub struct Field {
    pub label: &'static str,
    pub value: String,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub id: String,
    pub service: String,
    pub plan: String,
    pub engine: String,
    pub state: &'static str,
    pub created: String,
    pub created_age: String,
    pub organization_guid: String,
    pub space_guid: String,
}

#[derive(Debug, Serialize)]
pub struct OperationView {
    pub id: String,
    pub what: String,
    pub state: &'static str,
    pub progress: Option<String>,
    pub error: Option<String>,
    pub attempts: String,
    pub created: String,
    pub created_age: String,
    pub duration: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Binding {
    pub id: String,
    pub access: String,
    pub created: String,
    pub created_age: String,
    pub expires: Option<String>,
    pub state: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub kind: String,
    pub name: String,
    pub state: &'static str,
    pub size: Option<String>,
    pub dump_size: Option<String>,
    pub created: String,
    pub age: String,
    pub description: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Member {
    pub name: String,
    pub role: String,
    pub state: String,
    pub lag: String,
    pub address: String,
    pub zone: String,
    pub instance_type: String,
}

#[derive(Debug, Serialize)]
pub struct Page {
    pub instance: Summary,
    pub current: Option<OperationView>,
    pub operations: Vec<OperationView>,
    pub durations_chart: Option<BarChart>,
    pub connection: Vec<Field>,
    pub bindings: Vec<Binding>,
    pub snapshots: Vec<Snapshot>,
    pub sizes_chart: Option<LineChart>,
    pub preset: Option<String>,
    pub server: Vec<Field>,
    pub vm: Vec<Field>,
    pub members: Vec<Member>,
    /// The audit trail of the instance: the section is drawn only when there is something in it.
    pub events: Vec<Event>,
    pub generated: String,
    pub link_expires: String,
}

/// One audit event (who asked for what, when, how it ended), for the page's events section.
#[derive(Debug, Serialize)]
pub struct Event {
    pub at: String,
    pub who: String,
    pub what: String,
    pub outcome: String,
}

/// Reads everything the page shows about `instance`.
pub async fn load(
    conn: &mut PgConnection,
    catalog: &Catalog,
    instance: &InstanceRow,
    link_expires: i64,
) -> sqlx::Result<Page> {
    let now = Utc::now();
    let tasks = dashboard::instance_tasks(&mut *conn, &instance.id, TASKS_SHOWN).await?;
    let binding_rows = bindings::list_for_instance(&mut *conn, &instance.id).await?;
    let snapshot_rows =
        dashboard::instance_snapshots(&mut *conn, &instance.id, SNAPSHOTS_SHOWN).await?;
    let event_rows = events::for_instance(&mut *conn, &instance.id, None, EVENTS_SHOWN).await?;

    let plan = catalog.plan_by_id(&instance.plan_id);
    let latest = tasks
        .iter()
        .find(|t| {
            t.binding_id.is_none() && t.operation.is_some() && t.created_at >= instance.created_at
        })
        .and_then(|t| t.operation.zip(Some(t.state)));
    let summary = Summary {
        id: instance.id.clone(),
        service: plan
            .as_ref()
            .map_or_else(|| instance.service_id.clone(), |p| p.service.name.clone()),
        plan: plan
            .as_ref()
            .map_or_else(|| instance.plan_id.clone(), |p| p.plan.name.clone()),
        engine: plan
            .as_ref()
            .map_or_else(|| "-".to_string(), |p| p.plan.engine.as_str().to_string()),
        state: dashboard::instance_state(latest),
        created: text::timestamp(instance.created_at),
        created_age: text::age(instance.created_at, now),
        organization_guid: instance.organization_guid.clone(),
        space_guid: instance.space_guid.clone(),
    };

    let current = tasks
        .iter()
        .filter(|t| !t.state.is_finished())
        .min_by_key(|t| t.created_at)
        .map(|t| operation(t, now));
    let operations = tasks.iter().map(|t| operation(t, now)).collect();
    let runs: Vec<Run> = tasks
        .iter()
        .rev()
        .filter_map(|t| {
            let finished = t.finished_at?;
            Some(Run {
                label: what(t),
                secs: (finished - t.created_at).num_milliseconds().max(0) as f64 / 1000.0,
                succeeded: t.state == TaskState::Succeeded,
            })
        })
        .collect();

    let details = &instance.details;
    let backups: Vec<(DateTime<Utc>, i64)> = snapshot_rows
        .iter()
        .filter(|s| s.snapshot.kind == "backup" && s.snapshot.state == SnapshotState::Ready)
        .filter_map(|s| Some((s.snapshot.created_at, s.snapshot.size_bytes?)))
        .collect();
    Ok(Page {
        instance: summary,
        current,
        operations,
        durations_chart: charts::durations(&runs),
        connection: connection(details),
        bindings: binding_rows.iter().map(|b| binding(b, now)).collect(),
        snapshots: snapshot_rows.iter().map(|s| snapshot(s, now)).collect(),
        sizes_chart: charts::sizes(&backups),
        preset: instance
            .parameters
            .get("preset")
            .and_then(Value::as_str)
            .map(str::to_string),
        server: fields(details, SERVER_FIELDS),
        vm: vm(details),
        members: members(details),
        events: event_rows.iter().map(event).collect(),
        generated: text::timestamp(now),
        link_expires: DateTime::from_timestamp(link_expires, 0)
            .map_or_else(|| link_expires.to_string(), text::timestamp),
    })
}

/// An audit event as the page lists it: who is the platform and user (never the whole identity), and a
/// failure's error is redacted like every other error on the page.
fn event(row: &events::Event) -> Event {
    let what = match &row.binding_id {
        Some(binding) => format!("{} (binding {binding})", row.action),
        None => row.action.clone(),
    };
    let outcome = match (&row.outcome, &row.error) {
        (Some(outcome), Some(error)) => format!("{outcome}: {}", text::redact(error)),
        (Some(outcome), None) => outcome.clone(),
        (None, _) => "in progress".to_string(),
    };
    Event {
        at: text::timestamp(row.requested_at),
        who: row
            .actor
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |actor| actor.label()),
        what,
        outcome,
    }
}

/// What a task did, in words: its operation (with the binding it was for), else its kind.
fn what(task: &TaskRow) -> String {
    let name = task.operation.map_or_else(
        || task.kind.replace('_', " "),
        |o| o.as_str().replace('_', " "),
    );
    match (&task.binding_id, task.operation) {
        (Some(binding), Some(Operation::Bind | Operation::Unbind)) => format!("{name} {binding}"),
        _ => name,
    }
}

fn operation(task: &TaskRow, now: DateTime<Utc>) -> OperationView {
    OperationView {
        id: task.id.to_string(),
        what: what(task),
        state: task.state.as_str(),
        progress: task.progress.as_deref().map(text::redact),
        error: task
            .last_error
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(text::redact),
        attempts: format!("{}/{}", task.attempts_spent().max(0), task.max_attempts),
        created: text::timestamp(task.created_at),
        created_age: text::age(task.created_at, now),
        duration: task.finished_at.map(|f| {
            text::duration((f - task.created_at).num_milliseconds().max(0) as f64 / 1000.0)
        }),
    }
}

fn binding(row: &BindingRow, now: DateTime<Utc>) -> Binding {
    let access = row
        .details
        .get("access")
        .or_else(|| row.parameters.get("access"))
        .and_then(Value::as_str)
        .unwrap_or("read-write");
    let state = if row.revoked_at.is_some() {
        "revoked"
    } else if row.expired(now) {
        "expired"
    } else if row.credentials.is_some() {
        "active"
    } else {
        "being made"
    };
    Binding {
        id: row.id.clone(),
        access: access.to_string(),
        created: text::timestamp(row.created_at),
        created_age: text::age(row.created_at, now),
        expires: row
            .expires_at
            .map(|at| format!("{} ({})", text::timestamp(at), text::age(at, now))),
        state,
    }
}

fn snapshot(row: &InstanceSnapshot, now: DateTime<Utc>) -> Snapshot {
    let s = &row.snapshot;
    let name = match (&row.preset_name, s.version) {
        (Some(preset), Some(version)) => format!("{preset} v{version}"),
        (Some(preset), None) => preset.clone(),
        _ => s.id.to_string(),
    };
    Snapshot {
        kind: s.kind.clone(),
        name,
        state: s.state.as_str(),
        size: s.size_bytes.map(text::bytes),
        dump_size: s.dump_bytes.map(text::bytes),
        created: text::timestamp(s.created_at),
        age: text::age(s.created_at, now),
        description: s.description.clone(),
    }
}

/// Where apps connect: host and port (a Postgres server or cluster), or the bucket's endpoint.
fn connection(details: &Value) -> Vec<Field> {
    let mut out = fields(details, &[("host", "host"), ("port", "port")]);
    if let Some(members) = details.get("members").and_then(Value::as_array)
        && details.get("port").is_none()
    {
        let ports: Vec<String> = members
            .iter()
            .filter_map(|m| m.get("port").map(scalar))
            .collect();
        if !ports.is_empty() {
            out.push(Field {
                label: "ports (members)",
                value: ports.join(", "),
            });
        }
    }
    out.extend(fields(
        details,
        &[("endpoint", "S3 endpoint"), ("bucket", "bucket")],
    ));
    out
}

/// The `ec2` engine's VM (type, zone, address) with its hourly price from the candidates it was chosen from.
fn vm(details: &Value) -> Vec<Field> {
    let Some(ec2) = details.get("ec2") else {
        return Vec::new();
    };
    let mut out = fields(ec2, VM_FIELDS);
    let instance_type = ec2.get("instance_type").and_then(Value::as_str);
    let price = ec2
        .get("candidates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c.get("instance_type").and_then(Value::as_str) == instance_type)
        .and_then(|c| c.get("price"))
        .and_then(Value::as_f64);
    if let Some(price) = price {
        out.push(Field {
            label: "price",
            value: format!("{price:.4} USD/hour"),
        });
    }
    out
}

/// An HA cluster's members as the worker last recorded them.
fn members(details: &Value) -> Vec<Member> {
    let get = |m: &Value, key: &str| m.get(key).filter(|v| !v.is_null()).map(scalar);
    details
        .get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| Member {
            name: get(m, "name").unwrap_or_default(),
            role: get(m, "role").unwrap_or_else(|| "unknown".into()),
            state: get(m, "state").unwrap_or_else(|| "unknown".into()),
            lag: match m.get("lag") {
                Some(Value::Number(n)) => n.as_i64().map_or_else(|| n.to_string(), text::bytes),
                Some(v) if !v.is_null() => scalar(v),
                _ => "-".into(),
            },
            address: match (get(m, "host"), get(m, "port")) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (None, Some(port)) => format!(
                    "{}:{port}",
                    details.get("host").map(scalar).unwrap_or_default()
                ),
                (Some(host), None) => host,
                (None, None) => "-".into(),
            },
            zone: get(m, "zone").unwrap_or_else(|| "-".into()),
            instance_type: get(m, "instance_type").unwrap_or_else(|| "-".into()),
        })
        .collect()
}

/// The named scalar fields of `object` that are present, in the order given.
fn fields(object: &Value, names: &[(&str, &'static str)]) -> Vec<Field> {
    names
        .iter()
        .filter_map(|(key, label)| {
            let value = object
                .get(*key)
                .filter(|v| !v.is_null() && !v.is_object() && !v.is_array())?;
            Some(Field {
                label,
                value: scalar(value),
            })
        })
        .collect()
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        other => other.to_string(),
    }
}
