//! The path and query parameters of the OpenAPI document, in the sets the handlers take them. The handlers read
//! them through [`super::OsbParams`] and `OsbPath`, which accept more (unknown query keys are ignored); each set
//! here names what a route acts on, so one description serves every route that takes it.

use utoipa::{
    IntoParams,
    openapi::{
        Object, Required, Type,
        path::{Parameter, ParameterBuilder, ParameterIn},
    },
};

/// A string parameter.
fn string(name: &str, at: ParameterIn, required: bool, description: &str) -> Parameter {
    typed(name, at, required, description, Type::String)
}

fn typed(name: &str, at: ParameterIn, required: bool, description: &str, of: Type) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(at)
        .required(if required {
            Required::True
        } else {
            Required::False
        })
        .description(Some(description))
        .schema(Some(Object::with_type(of)))
        .build()
}

/// Declares a unit struct whose parameters are the listed ones.
macro_rules! parameter_set {
    ($(#[$doc:meta])* $name:ident => [$($param:expr),+ $(,)?]) => {
        $(#[$doc])*
        pub(crate) struct $name;

        impl IntoParams for $name {
            fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
                vec![$($param),+]
            }
        }
    };
}

const INSTANCE_ID: &str =
    "The platform's id of the service instance (1 to 255 printable characters).";
const BINDING_ID: &str = "The platform's id of the binding (1 to 255 printable characters).";

parameter_set!(
    /// `{instance_id}`.
    InstanceIdPath => [string("instance_id", ParameterIn::Path, true, INSTANCE_ID)]
);

parameter_set!(
    /// `{instance_id}` and `{binding_id}`.
    BindingIdPath => [
        string("instance_id", ParameterIn::Path, true, INSTANCE_ID),
        string("binding_id", ParameterIn::Path, true, BINDING_ID),
    ]
);

parameter_set!(
    /// `{instance_id}` and `{backup_id}`.
    BackupIdPath => [
        string("instance_id", ParameterIn::Path, true, INSTANCE_ID),
        string("backup_id", ParameterIn::Path, true, "The backup's id (a UUID), as the list of backups shows it."),
    ]
);

parameter_set!(
    /// `?accepts_incomplete=`.
    AcceptsIncomplete => [typed(
        "accepts_incomplete",
        ParameterIn::Query,
        false,
        "`true`: the client accepts an asynchronous answer (202 + operation). Without it, only plans the \
         catalog marks synchronous (and every bind and unbind) are served, once the work is done; others \
         answer 422 `AsyncRequired`.",
        Type::Boolean,
    )]
);

parameter_set!(
    /// The Akkeris query form of the per-operation webhook.
    WebhookQuery => [
        string("webhook", ParameterIn::Query, false, "A URL berth posts to (signed) when the operation ends; \
            with `secret`. The operator's policy decides which targets are allowed (400 otherwise)."),
        string("secret", ParameterIn::Query, false, "The webhook's signing secret; with `webhook`."),
    ]
);

parameter_set!(
    /// What OSB requires on a DELETE.
    DeleteQuery => [
        string("service_id", ParameterIn::Query, true, "The instance's service (required by OSB)."),
        string("plan_id", ParameterIn::Query, true, "The instance's plan (required by OSB)."),
    ]
);

parameter_set!(
    /// A `last_operation` poll.
    PollQuery => [
        string("operation", ParameterIn::Query, false, "The operation a 202 answered with (the newest one \
            when absent)."),
        string("service_id", ParameterIn::Query, false, "Accepted as OSB defines it; not needed."),
        string("plan_id", ParameterIn::Query, false, "Accepted as OSB defines it; not needed."),
    ]
);

parameter_set!(
    /// A preset's namespace.
    NamespaceParam => [string("namespace", ParameterIn::Query, false, "The preset's namespace (the default, \
        empty one when absent).")]
);

parameter_set!(
    /// A preset's name in the path.
    PresetNamePath => [
        string("name", ParameterIn::Path, true, "The preset's name."),
        string("namespace", ParameterIn::Query, false, "The preset's namespace (the default, empty one when \
            absent)."),
    ]
);

parameter_set!(
    /// A page of an instance's audit trail.
    EventsQuery => [
        typed("limit", ParameterIn::Query, false, "Events on the page, 1 to 500 (50).", Type::Integer),
        typed("before", ParameterIn::Query, false, "The `next` of the previous page: events older than this \
            one.", Type::Integer),
    ]
);

parameter_set!(
    /// A page of the list of instances.
    InstancePageQuery => [
        typed("limit", ParameterIn::Query, false, "Instances on the page, 1 to 1000 (100).", Type::Integer),
        string("after", ParameterIn::Query, false, "The `next_after` of the previous page: instances whose id \
            sorts after this one."),
    ]
);

parameter_set!(
    /// A preset's name and one of its versions in the path.
    PresetVersionPath => [
        string("name", ParameterIn::Path, true, "The preset's name."),
        typed("version", ParameterIn::Path, true, "The version's number (1, 2, ...).", Type::Integer),
        string("namespace", ParameterIn::Query, false, "The preset's namespace (the default, empty one when \
            absent)."),
    ]
);
