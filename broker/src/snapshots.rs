//! Presets and backups as the API and the worker both see them: the instance parameters that ask for them
//! (`preset`, `restore_from`, `backups`), preset names, lock keys, and where objects go in the store.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::crypto::random_password;

/// Most backups an instance keeps.
pub const MAX_RETENTION: i64 = 1000;

/// What a deprovision does with the instance's backups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    /// They stay listed and restorable (into a new instance with `restore_from`).
    Keep,
    /// They are deleted with the instance.
    Delete,
}

/// The `backups` instance parameter: `{schedule: "<cron>", retention: N, on_delete?: "keep"|"delete"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPolicy {
    pub schedule: String,
    pub retention: i32,
    pub on_delete: OnDelete,
}

impl BackupPolicy {
    /// The policy in `parameters`, `None` when they ask for no backups. The message names the field.
    pub fn of(parameters: &Value) -> Result<Option<Self>, String> {
        let Some(backups) = parameters.get("backups").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let schedule = backups
            .get("schedule")
            .and_then(Value::as_str)
            .ok_or("backups.schedule must be a cron expression such as \"0 3 * * *\"")?;
        parse_cron(schedule)
            .map_err(|e| format!("backups.schedule {schedule:?} is not a cron expression: {e}"))?;
        let retention = match backups.get("retention") {
            None | Some(Value::Null) => 7,
            Some(v) => v
                .as_i64()
                .filter(|n| (1..=MAX_RETENTION).contains(n))
                .ok_or(format!(
                    "backups.retention must be a whole number from 1 to {MAX_RETENTION}"
                ))?,
        };
        let on_delete = match backups.get("on_delete").and_then(Value::as_str) {
            None | Some("keep") => OnDelete::Keep,
            Some("delete") => OnDelete::Delete,
            Some(other) => {
                return Err(format!(
                    "backups.on_delete must be \"keep\" or \"delete\", not {other:?}"
                ));
            }
        };
        Ok(Some(Self {
            schedule: schedule.to_string(),
            retention: retention as i32,
            on_delete,
        }))
    }

    /// The first run strictly after `after`.
    pub fn next_run(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        next_run(&self.schedule, after)
    }
}

fn parse_cron(schedule: &str) -> Result<Cron, croner::errors::CronError> {
    // Five fields as crontab, or six with seconds first.
    Cron::new(schedule).with_seconds_optional().parse()
}

/// The first time `schedule` fires strictly after `after`; `None` for a bad or never-firing expression.
pub fn next_run(schedule: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    parse_cron(schedule)
        .ok()?
        .find_next_occurrence(&after, false)
        .ok()
}

/// A preset and, optionally, one of its versions (the newest ready one when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresetRef {
    pub namespace: String,
    pub name: String,
    pub version: Option<i32>,
}

impl PresetRef {
    /// The `preset` parameter: `{name, namespace?, version?}` or just the name.
    pub fn of(parameters: &Value) -> Result<Option<Self>, String> {
        let Some(preset) = parameters.get("preset").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let (name, namespace, version) = match preset {
            Value::String(name) => (name.as_str(), "", None),
            Value::Object(o) => (
                o.get("name")
                    .and_then(Value::as_str)
                    .ok_or("preset.name must be a string")?,
                o.get("namespace").and_then(Value::as_str).unwrap_or(""),
                match o.get("version") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_i64()
                            .and_then(|n| i32::try_from(n).ok())
                            .filter(|n| *n > 0)
                            .ok_or("preset.version must be a positive whole number")?,
                    ),
                },
            ),
            _ => return Err("preset must be a name or {name, namespace?, version?}".into()),
        };
        check_preset_name(name)?;
        check_namespace(namespace)?;
        Ok(Some(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            version,
        }))
    }
}

/// The `restore_from` parameter: `{instance, backup}` (backup: the id from the backups list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreFrom {
    pub instance_id: String,
    pub backup_id: Uuid,
}

impl RestoreFrom {
    pub fn of(parameters: &Value) -> Result<Option<Self>, String> {
        let Some(from) = parameters.get("restore_from").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let instance_id = from
            .get("instance")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("restore_from.instance must name the instance the backup was taken of")?;
        let backup_id = from
            .get("backup")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::from_str(s).ok())
            .ok_or(
                "restore_from.backup must be a backup id (a UUID from the instance's backups list)",
            )?;
        Ok(Some(Self {
            instance_id: instance_id.to_string(),
            backup_id,
        }))
    }
}

/// Preset names: 1-100 characters of letters, digits, `.`, `_` and `-`, starting with a letter or digit.
pub fn check_preset_name(name: &str) -> Result<(), String> {
    let ok = (1..=100).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "preset name {name:?} must be 1-100 characters of letters, digits, '.', '_' and '-', starting with a \
             letter or digit"
        ))
    }
}

/// Namespaces (db-p's `<repo>/<branch>`): empty, or up to 200 characters of what names allow plus `/`.
pub fn check_namespace(namespace: &str) -> Result<(), String> {
    let ok = namespace.is_empty()
        || (namespace.len() <= 200
            && namespace
                .split('/')
                .all(|part| check_preset_name(part).is_ok()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "namespace {namespace:?} must be segments of letters, digits, '.', '_' and '-' separated by '/' \
             (at most 200 characters)"
        ))
    }
}

/// A new lock key (handed once to whoever locked the preset) and the hash stored in its place.
pub fn new_lock_key() -> (String, Vec<u8>) {
    let key = format!("lk_{}", random_password(40));
    let hash = lock_key_hash(&key);
    (key, hash)
}

pub fn lock_key_hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Object key of a preset version, under the store's prefix.
pub fn preset_object_key(namespace: &str, name: &str, version: i32, snapshot: Uuid) -> String {
    let ns = if namespace.is_empty() {
        "_".to_string()
    } else {
        namespace.to_string()
    };
    format!("presets/{ns}/{name}/v{version}-{snapshot}.bsnap")
}

/// Object key of a backup, under the store's prefix.
pub fn backup_object_key(instance_id: &str, at: DateTime<Utc>, snapshot: Uuid) -> String {
    format!(
        "backups/{}/{}-{snapshot}.bsnap",
        crate::names::short_hash(instance_id),
        at.format("%Y%m%dT%H%M%SZ")
    )
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    #[test]
    fn backup_policy_reads_defaults_and_names_bad_fields() {
        let policy = BackupPolicy::of(&json!({"backups": {"schedule": "0 3 * * *"}}))
            .unwrap()
            .unwrap();
        assert_eq!(policy.retention, 7);
        assert_eq!(policy.on_delete, OnDelete::Keep);
        assert_eq!(BackupPolicy::of(&json!({})).unwrap(), None);
        let err = BackupPolicy::of(&json!({"backups": {"schedule": "every day"}})).unwrap_err();
        assert!(err.contains("backups.schedule"), "{err}");
        let err = BackupPolicy::of(&json!({"backups": {"schedule": "* * * * *", "retention": 0}}))
            .unwrap_err();
        assert!(err.contains("backups.retention"), "{err}");
        let err =
            BackupPolicy::of(&json!({"backups": {"schedule": "* * * * *", "on_delete": "x"}}))
                .unwrap_err();
        assert!(err.contains("on_delete"), "{err}");
    }

    #[test]
    fn next_run_is_strictly_after() {
        let at = Utc.with_ymd_and_hms(2026, 11, 23, 3, 0, 0).unwrap();
        let next = next_run("0 3 * * *", at).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 11, 24, 3, 0, 0).unwrap());
        let every_second = next_run("* * * * * *", at).unwrap();
        assert_eq!(every_second, at + chrono::Duration::seconds(1));
    }

    #[test]
    fn preset_refs_and_names() {
        let r = PresetRef::of(&json!({"preset": {"name": "orders", "version": 2}}))
            .unwrap()
            .unwrap();
        assert_eq!((r.name.as_str(), r.version), ("orders", Some(2)));
        let r = PresetRef::of(&json!({"preset": "orders"}))
            .unwrap()
            .unwrap();
        assert_eq!(r.version, None);
        assert!(PresetRef::of(&json!({"preset": {"name": "../etc"}})).is_err());
        assert!(PresetRef::of(&json!({"preset": {"name": "a", "version": 0}})).is_err());
        assert!(check_namespace("repo/main").is_ok());
        assert!(check_namespace("repo//main").is_err());
        assert!(check_namespace("/abs").is_err());
    }

    #[test]
    fn lock_keys_are_random_and_hashed() {
        let (a, ha) = new_lock_key();
        let (b, _) = new_lock_key();
        assert_ne!(a, b);
        assert_eq!(lock_key_hash(&a), ha);
        assert_ne!(lock_key_hash(&b), ha);
    }

    #[test]
    fn restore_from_needs_instance_and_backup_uuid() {
        let id = Uuid::new_v4();
        let r =
            RestoreFrom::of(&json!({"restore_from": {"instance": "i1", "backup": id.to_string()}}))
                .unwrap()
                .unwrap();
        assert_eq!(r.backup_id, id);
        assert!(
            RestoreFrom::of(&json!({"restore_from": {"instance": "i1", "backup": "latest"}}))
                .is_err()
        );
    }
}
