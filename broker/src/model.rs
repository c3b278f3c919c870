//! The broker's vocabulary: ids, task kinds and states, and the payloads the API hands the worker.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// An OSB service instance id, as the platform chose it.
    InstanceId
);
string_id!(
    /// An OSB service binding id, as the platform chose it.
    BindingId
);

/// A task id; also the OSB `operation` handed back to the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub Uuid);

impl TaskId {
    /// Time-ordered (UUIDv7): tasks enqueued together sit together in the primary key, so a deep queue's
    /// claims and completions touch few index pages instead of one random page per task.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

text_enum! {
    /// Where a task is in its life. Stored as text in `tasks.state`.
    pub enum TaskState ("task state") {
        Pending = "pending",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
    }
}

impl TaskState {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

text_enum! {
    /// The OSB operation a task answers. Stored as text in `tasks.operation`.
    pub enum Operation ("operation") {
        Provision = "provision",
        Update = "update",
        Deprovision = "deprovision",
        Bind = "bind",
        Unbind = "unbind",
        /// The Akkeris action `PUT /v2/service_instances/{id}/actions/credentials`: every binding of the instance
        /// gets new credentials and its old ones are revoked. An instance operation (no binding), like update.
        RotateCredentials = "rotate_credentials",
        /// Resets the instance's database to a snapshot: a preset version (`select`) or a backup (`restore`).
        Restore = "restore",
        /// `POST /berth/v1/instances/{id}/switchover`: a planned change of an HA cluster's primary to a named or
        /// any healthy replica. An instance operation, like update.
        Switchover = "switchover",
        /// `POST /berth/v1/instances/{id}/failover`: a forced change of primary, also when the current one is not
        /// healthy.
        Failover = "failover",
    }
}

impl Operation {
    /// The task kind that carries this operation out.
    pub fn task_kind(self) -> &'static str {
        match self {
            Self::Provision => kinds::PROVISION,
            Self::Update => kinds::UPDATE,
            Self::Deprovision => kinds::DEPROVISION,
            Self::Bind => kinds::BIND,
            Self::Unbind => kinds::UNBIND,
            Self::RotateCredentials => kinds::ROTATE_CREDENTIALS,
            Self::Restore => kinds::RESTORE,
            Self::Switchover | Self::Failover => kinds::CHANGE_PRIMARY,
        }
    }
}

/// Task kind names, as stored in `tasks.kind`. The worker registers one handler per kind.
pub mod kinds {
    pub const PROVISION: &str = "instance.provision";
    pub const UPDATE: &str = "instance.update";
    pub const DEPROVISION: &str = "instance.deprovision";
    pub const BIND: &str = "binding.create";
    pub const UNBIND: &str = "binding.delete";
    pub const ROTATE_CREDENTIALS: &str = "instance.rotate_credentials";
    /// Switchover or failover of an HA cluster (the task's `operation` says which).
    pub const CHANGE_PRIMARY: &str = "instance.change_primary";
    pub const DELIVER_WEBHOOK: &str = "webhook.deliver";
    /// Does nothing (or sleeps `sleep_ms`): the queue's benchmark and crash tests use it.
    pub const NOOP: &str = "noop";
    /// Snapshots an instance's database as a preset version.
    pub const PUSH_PRESET: &str = "preset.push";
    /// Snapshots an instance's database as a backup.
    pub const BACKUP: &str = "instance.backup";
    /// Resets an instance's database to a snapshot (a preset version or a backup).
    pub const RESTORE: &str = "instance.restore";
    /// Revokes an expired binding's credentials (enqueued by the reconcile loop, not an OSB operation).
    pub const EXPIRE_BINDING: &str = "binding.expire";
    /// Deletes the store objects queued in `snapshot_objects_to_delete` and the cached templates of deleted
    /// preset versions (enqueued by the delete routes of presets and backups).
    pub const DELETE_SNAPSHOTS: &str = "snapshot.delete";
    /// Makes one warm-pool item (berth's own, not an OSB instance).
    pub const POOL_FILL: &str = "pool.fill";
    /// Removes one warm-pool item and everything it made.
    pub const POOL_REMOVE: &str = "pool.remove";
}

/// What an update task applies once the provider has made the change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpdatePayload {
    pub plan_id: String,
    pub parameters: serde_json::Value,
    pub context: serde_json::Value,
    pub maintenance_version: Option<String>,
    /// The request itself named a `preset`: reset the database to it (db-p's select).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub select_preset: bool,
}

/// What a switchover or failover task asks for: a member to promote, or any healthy replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChangePrimaryPayload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
}

/// Where to tell someone that a task ended. The secret is sealed before it is stored.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: secrecy::SecretString,
}

/// The body POSTed to a webhook. Never carries credentials.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookBody {
    pub instance_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding_id: Option<String>,
    pub operation: String,
    pub state: String,
    pub description: String,
}
