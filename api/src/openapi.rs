//! `GET /openapi.json`: the OpenAPI 3.1 document of every route under `/v2` and `/berth/v1`, derived from the
//! handlers' `#[utoipa::path]` annotations and the types their requests and answers are (de)serialized with.
//! What the layers add to every route (basic auth, the OSB version check, the body limit, the request timeout,
//! the answers of a broken database) is added here, once, by [`LayerAnswers`], as the layers are in `router()`.
//!
//! It is served without credentials: it describes the API's shape, which is public (the source is), and holds
//! nothing of the deployment (no catalog, no hosts); the catalog, which says what this broker serves, stays
//! behind basic auth. Tools (client generators, a platform's importer, schemathesis) fetch it without set-up.
//! `api/tests/api/openapi.rs` checks that the routes it documents are the routes the router serves.

use std::sync::LazyLock;

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderValue, header},
    response::Response,
    routing::get,
};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        Components, ContentBuilder, HeaderBuilder, ObjectBuilder, Ref, RefOr, Required, Type,
        path::{Operation, ParameterBuilder, ParameterIn},
        response::ResponseBuilder,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use crate::{AppState, routes};

/// The name of the security scheme every documented route requires.
const BASIC_AUTH: &str = "broker_basic_auth";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "berth",
        description = "berth, an Open Service Broker (OSB API 2.13 to 2.17) for Postgres databases, servers and \
            clusters, and S3 buckets: the OSB routes under `/v2` and berth's own under `/berth/v1` (presets, \
            backups, HA switchover, EC2 price check). Every route takes the broker's credentials (HTTP basic \
            auth); `/v2` routes also need `X-Broker-API-Version`. Refusals have the OSB error shape \
            `{\"error\", \"description\"}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        routes::catalog::catalog,
        routes::instances::provision,
        routes::instances::update,
        routes::instances::deprovision,
        routes::instances::fetch,
        routes::instances::last_operation,
        routes::instances::rotate_credentials,
        routes::bindings::bind,
        routes::bindings::unbind,
        routes::bindings::fetch,
        routes::bindings::last_operation,
        routes::backups::akkeris_list,
        routes::backups::akkeris_take,
        routes::backups::akkeris_show,
        routes::backups::akkeris_restore,
        routes::backups::list,
        routes::backups::take,
        routes::backups::show,
        routes::backups::restore,
        routes::backups::task,
        routes::presets::list,
        routes::presets::push_new,
        routes::presets::show,
        routes::presets::versions,
        routes::presets::push,
        routes::presets::get_lock,
        routes::presets::lock,
        routes::presets::unlock,
        routes::presets::select,
        routes::price_check::price_check,
        routes::cluster::switchover,
        routes::cluster::failover,
        routes::events::list,
        routes::instance_list::list,
        routes::instance_list::show,
        routes::presets::delete_preset,
        routes::presets::delete_version,
        routes::backups::delete_backup,
        routes::dashboard::operator_overview,
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&LayerAnswers),
    security(("broker_basic_auth" = [])),
    tags(
        (name = "catalog", description = "OSB: what this broker serves"),
        (name = "service instances", description = "OSB: provision, update, deprovision, fetch, poll"),
        (name = "service bindings", description = "OSB: bind, unbind, fetch, poll"),
        (name = "backups", description = "Backups of an instance (also under `/v2/.../actions/backups` for Akkeris)"),
        (name = "presets", description = "Named, versioned snapshots of a database"),
        (name = "ha clusters", description = "Switchover and failover of an `ha` instance"),
        (name = "dedicated servers", description = "What an EC2 server would cost"),
        (name = "tasks", description = "The state of any operation"),
    ),
)]
pub struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as served, rendered once.
static RENDERED: LazyLock<Bytes> = LazyLock::new(|| {
    Bytes::from(
        document()
            .to_pretty_json()
            .expect("the OpenAPI document serializes"),
    )
});

/// `GET /openapi.json`, without credentials (see the module's documentation).
pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(serve))
}

async fn serve() -> Response {
    let mut response = Response::new(Body::from(RENDERED.clone()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Adds what the layers of `router()` add to every route: the basic-auth scheme and its refusals (401, 429),
/// on `/v2` the OSB headers and the version check's 412, the body limit's 413 and the JSON extractor's 415
/// where a route takes a body, the request timeout's 408, and the 500/503 any route gives when the broker
/// (or its database) fails.
struct LayerAnswers;

/// Answers every route may give, by status: (name in `components.responses`, status, description).
const EVERY_ROUTE: &[(&str, &str, &str)] = &[
    (
        "Unauthorized",
        "401",
        "Missing or wrong broker credentials (`WWW-Authenticate: Basic`)",
    ),
    (
        "RequestTimeout",
        "408",
        "The broker did not answer within 30 s; retry",
    ),
    (
        "TooManyRequests",
        "429",
        "Too many failed logins from this address; retry after `Retry-After` seconds",
    ),
    (
        "InternalError",
        "500",
        "An error in the broker; the cause is in its log",
    ),
    (
        "ServiceUnavailable",
        "503",
        "The broker's database is not answering; retry",
    ),
];
const WITH_A_BODY: &[(&str, &str, &str)] = &[
    (
        "BadRequest",
        "400",
        "A malformed request (the body, a query or path parameter, a header)",
    ),
    (
        "PayloadTooLarge",
        "413",
        "The body is larger than the broker's limit",
    ),
    (
        "UnsupportedMediaType",
        "415",
        "A `Content-Type` other than JSON",
    ),
];
const OSB_ONLY: &[(&str, &str, &str)] = &[(
    "PreconditionFailed",
    "412",
    "`X-Broker-API-Version` missing or below 2.13",
)];

impl Modify for LayerAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Components::new);
        components.add_security_scheme(
            BASIC_AUTH,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some("The broker's credentials"))
                    .build(),
            ),
        );
        for (name, _, description) in EVERY_ROUTE.iter().chain(WITH_A_BODY).chain(OSB_ONLY) {
            let mut response = ResponseBuilder::new().description(*description).content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            );
            match *name {
                "Unauthorized" => {
                    response = response.header(
                        "WWW-Authenticate",
                        HeaderBuilder::new()
                            .schema(string_schema())
                            .description(Some("`Basic realm=\"berth\"`"))
                            .build(),
                    );
                }
                "TooManyRequests" => {
                    response = response.header(
                        "Retry-After",
                        HeaderBuilder::new()
                            .schema(ObjectBuilder::new().schema_type(Type::Integer))
                            .description(Some("Seconds"))
                            .build(),
                    );
                }
                _ => {}
            }
            components
                .responses
                .insert(name.to_string(), RefOr::T(response.build()));
        }

        for (path, item) in openapi.paths.paths.iter_mut() {
            let osb = path.starts_with("/v2/");
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                add_layer_answers(operation, osb);
            }
        }
    }
}

fn string_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn add_layer_answers(operation: &mut Operation, osb: bool) {
    let mut answers: Vec<&(&str, &str, &str)> = EVERY_ROUTE.iter().collect();
    if operation.request_body.is_some() {
        answers.extend(WITH_A_BODY);
    }
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    if osb {
        answers.extend(OSB_ONLY);
        parameters.push(
            ParameterBuilder::new()
                .name("X-Broker-API-Version")
                .parameter_in(ParameterIn::Header)
                .required(Required::True)
                .description(Some(
                    "The OSB API version the platform speaks: 2.13 or later (412 otherwise).",
                ))
                .schema(Some(
                    string_schema()
                        .enum_values(Some(["2.13", "2.14", "2.15", "2.16", "2.17"]))
                        .default(Some("2.17".into())),
                ))
                .build(),
        );
        parameters.push(
            ParameterBuilder::new()
                .name("X-Broker-API-Originating-Identity")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "`<platform> <base64 of a JSON object>`: who on the platform asked; recorded with the \
                     operation (at most 4096 bytes).",
                ))
                .schema(Some(string_schema().max_length(Some(4096))))
                .build(),
        );
    }
    parameters.push(
        ParameterBuilder::new()
            .name("X-Broker-API-Request-Identity")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some("Echoed on the answer, to match it with the request."))
            .schema(Some(string_schema()))
            .build(),
    );
    for (name, status, _) in answers {
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::Ref(Ref::new(format!("#/components/responses/{name}"))));
    }
}
