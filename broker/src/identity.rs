//! Who asked: the platform and user named by an `X-Broker-API-Originating-Identity` value as the API stores it
//! (`{"platform": ..., "value": {...}}`, or `{"platform": ..., "raw": "..."}` when it did not decode). Logs and the
//! audit trail show only these two, never the whole value, which may hold more (names, e-mail addresses).

use serde::Serialize;
use serde_json::Value;

/// The platform and the user id of an originating identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Actor {
    /// `cloudfoundry`, `kubernetes`, `berth` (berth itself: an expiry), ...
    pub platform: String,
    /// The user's id: Cloud Foundry's `user_id`, Kubernetes' `uid` or `username`; berth's own tasks give their
    /// `reason`. `None` when the value names none of these (or did not decode).
    pub user_id: Option<String>,
}

impl Actor {
    /// The actor of a stored identity; `None` without a platform.
    pub fn from_identity(identity: &Value) -> Option<Self> {
        let platform = identity.get("platform")?.as_str()?.to_string();
        let value = identity.get("value");
        let user_id = ["user_id", "uid", "username", "reason"]
            .iter()
            .find_map(|key| value?.get(key)?.as_str())
            .map(str::to_string);
        Some(Self { platform, user_id })
    }

    /// `platform/user` (or the platform alone), for a log field.
    pub fn label(&self) -> String {
        match &self.user_id {
            Some(user) => format!("{}/{user}", self.platform),
            None => self.platform.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn actors_name_the_platform_and_user_only() {
        let cf =
            json!({"platform": "cloudfoundry", "value": {"user_id": "683ea748", "email": "a@b.c"}});
        let actor = Actor::from_identity(&cf).unwrap();
        assert_eq!(actor.label(), "cloudfoundry/683ea748");
        let k8s =
            json!({"platform": "kubernetes", "value": {"username": "admin", "groups": ["x"]}});
        assert_eq!(
            Actor::from_identity(&k8s).unwrap().label(),
            "kubernetes/admin"
        );
        let raw = json!({"platform": "custom", "raw": "not-base64"});
        assert_eq!(
            Actor::from_identity(&raw).unwrap(),
            Actor {
                platform: "custom".into(),
                user_id: None
            }
        );
        assert_eq!(Actor::from_identity(&json!({"value": {}})), None);
    }
}
