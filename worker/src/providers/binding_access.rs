//! The access a binding asks for (the `access` bind parameter): shared by every engine that binds.

use broker::db::bindings::BindingRow;
use serde_json::Value;

use crate::registry::TaskError;

/// Absent or null is read-write; anything but the two names is Fatal (the catalog's bind schemas only let
/// the two names through, so anything else is a row written by hand, refused rather than guessed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadWrite,
    ReadOnly,
}

impl Access {
    pub(crate) fn of(binding: &BindingRow) -> Result<Self, TaskError> {
        match binding.parameters.get("access") {
            None | Some(Value::Null) => Ok(Self::ReadWrite),
            Some(Value::String(s)) if s == "read-write" => Ok(Self::ReadWrite),
            Some(Value::String(s)) if s == "read-only" => Ok(Self::ReadOnly),
            Some(other) => Err(TaskError::fatal(format!(
                "binding parameter `access` must be \"read-write\" or \"read-only\", not {other}"
            ))),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
        }
    }
}
