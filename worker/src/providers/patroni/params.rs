//! The `ha` plan's parameters as the engine acts on them: the cluster's own (`members`, `synchronous`) and a
//! server's, read as the `dedicated` plan reads them. The schema checked them at the API already; a payload
//! that does not parse here is Fatal.

use serde_json::Value;

use crate::{providers::postgres::ServerParams, registry::TaskError};

#[derive(Debug, Clone)]
pub struct Params {
    pub members: usize,
    pub synchronous: bool,
    pub server: ServerParams,
}

impl Params {
    pub fn of(parameters: &Value) -> Result<Self, TaskError> {
        let members = match parameters.get("members") {
            None | Some(Value::Null) => broker::pools::HA_DEFAULT_MEMBERS as usize,
            Some(v) => v
                .as_u64()
                .filter(|n| (3..=7).contains(n) && n % 2 == 1)
                .ok_or_else(|| {
                    TaskError::fatal(format!("parameter `members` must be 3, 5 or 7, not {v}"))
                })? as usize,
        };
        let synchronous = match parameters.get("synchronous") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(TaskError::fatal(format!(
                    "parameter `synchronous` must be true or false, not {v}"
                )));
            }
        };
        let server = ServerParams::of(parameters)?;
        // `throwaway` turns replication off (wal_level minimal): no use for a cluster.
        if server.tuning_profile == "throwaway" {
            return Err(TaskError::fatal(
                "parameter `tuning_profile` must be one of default, oltp, web, analytics",
            ));
        }
        Ok(Self {
            members,
            synchronous,
            server,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_bad_values() {
        let p = Params::of(&json!({})).unwrap();
        assert_eq!(
            (p.members, p.synchronous, p.server.tuning_profile.as_str()),
            (3, false, "default")
        );
        let p = Params::of(&json!({"members": 5, "synchronous": true, "postgres_version": "15"}))
            .unwrap();
        assert_eq!(
            (
                p.members,
                p.synchronous,
                p.server.postgres_version.as_deref()
            ),
            (5, true, Some("15"))
        );
        for bad in [
            json!({"members": 4}),
            json!({"members": 9}),
            json!({"members": "3"}),
            json!({"synchronous": 1}),
            json!({"tuning_profile": "throwaway"}),
            json!({"app_db_name": "pg_x"}),
        ] {
            assert!(Params::of(&bad).is_err(), "{bad}");
        }
    }
}
