//! The HTTP surface: routes, their extractors' error handling, and the middleware around them.

mod advisor;
pub mod body;
mod caller;
mod conversations;
mod core;
pub mod errors;
pub mod head_deadline;
mod health;
mod metrics;
pub mod middleware;
pub mod openapi;
pub mod request_id;
mod sync;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use secrecy::SecretString;

use actix_cors::Cors;
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::{Method, header};
use actix_web::middleware::from_fn;
use actix_web::{HttpRequest, Scope, web};

use crate::auth::middleware::require_api_key;
use crate::config::Mode;
use crate::service::ConversationService;
use crate::sync::SyncSide;
use crate::sync::protocol::MAX_PUSH_BYTES;
use errors::ApiError;

/// What the handlers share.
pub struct AppState {
    pub service: ConversationService,
    pub mode: Mode,
    /// Local mode: the tenant every request belongs to. Cloud mode: none, the key tells.
    pub local_tenant: Option<String>,
    pub max_message_bytes: usize,
    pub started: Instant,
    /// Set on SIGTERM: `/health/ready` answers 503 while in-flight work finishes.
    pub draining: Arc<AtomicBool>,
    pub metrics_token: Option<SecretString>,
    /// How long a request body may take to arrive.
    pub body_timeout: std::time::Duration,
    pub sync: SyncSide,
    /// Cloud mode: the rate limiter, whose state `/health` reports.
    pub rate_limiter: Option<Arc<crate::ratelimit::RateLimiter>>,
    /// Conversation turns: run on the server's runtime, counted so that a stop waits for them.
    pub turns: crate::turns::Turns,
}

/// Routes and extractor settings. With the gate (cloud mode), every `/api` route needs a key
/// (unverified keys limited per address, then the key's quota); `/health` never does.
pub fn configure(cfg: &mut web::ServiceConfig, max_message_bytes: usize, gate: bool) {
    // Past these, 413: room for each text the route takes, however it is escaped.
    let core_limit = body::body_limit(max_message_bytes, 1);
    let advisor_limit = body::body_limit(max_message_bytes, 2);
    cfg.app_data(
        web::JsonConfig::default()
            .limit(core_limit)
            .error_handler(json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(query_error))
    .app_data(web::PathConfig::default().error_handler(path_error))
    .service(
        web::resource("/health")
            .route(web::get().to(health::health))
            .default_service(web::to(only("GET"))),
    )
    .service(
        web::resource("/health/live")
            .route(web::get().to(health::live))
            .default_service(web::to(only("GET"))),
    )
    .service(
        web::resource("/health/ready")
            .route(web::get().to(health::ready))
            .default_service(web::to(only("GET"))),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics::metrics))
            .default_service(web::to(only("GET"))),
    )
    .service(
        web::resource("/openapi.json")
            .route(web::get().to(openapi::openapi_json))
            .default_service(web::to(only("GET"))),
    )
    .default_service(web::to(not_found));
    if gate {
        cfg.service(api_routes(advisor_limit).wrap(from_fn(require_api_key)));
    } else {
        cfg.service(api_routes(advisor_limit));
    }
}

fn api_routes(advisor_limit: usize) -> Scope {
    web::scope("/api")
        .service(
            web::resource("/maestra/core")
                .wrap(from_fn(middleware::overhead_header))
                .route(web::post().to(core::core))
                .default_service(web::to(only("POST"))),
        )
        .service(
            web::resource("/maestra/advisor/ask")
                // A question and its context: two texts.
                .app_data(
                    web::JsonConfig::default()
                        .limit(advisor_limit)
                        .error_handler(json_error),
                )
                .wrap(from_fn(middleware::overhead_header))
                .route(web::post().to(advisor::ask))
                .default_service(web::to(only("POST"))),
        )
        .service(
            web::resource("/maestra/conversations")
                .route(web::get().to(conversations::list))
                .default_service(web::to(only("GET"))),
        )
        .service(
            web::resource("/maestra/conversations/{conversation_id}")
                .route(web::get().to(conversations::get))
                .route(web::delete().to(conversations::delete))
                .default_service(web::to(only("GET, DELETE"))),
        )
        .service(
            web::resource("/maestra/sync")
                .route(web::get().to(sync::status))
                .default_service(web::to(only("GET"))),
        )
        .service(
            web::resource("/maestra/sync/now")
                .route(web::post().to(sync::now))
                .default_service(web::to(only("POST"))),
        )
        .service(
            web::resource("/maestra/sync/push")
                .app_data(
                    web::JsonConfig::default()
                        .limit(MAX_PUSH_BYTES)
                        .error_handler(json_error),
                )
                .route(web::post().to(sync::push))
                .default_service(web::to(only("POST"))),
        )
        .service(
            web::resource("/maestra/sync/pull")
                .route(web::post().to(sync::pull))
                .default_service(web::to(only("POST"))),
        )
        .default_service(web::to(not_found))
}

/// Browsers may call only from extension pages (and the configured extra origins): a web page
/// must not read someone's conversations off their loopback server. With `extension_ids`,
/// only those extensions: any other installed one must not read them either.
pub fn cors(extra_origins: &[String], extension_ids: &[String]) -> Cors {
    let extra: Vec<String> = extra_origins.to_vec();
    let extension_ids: Vec<String> = extension_ids.to_vec();
    Cors::default()
        .allowed_origin_fn(move |origin, _| {
            let Ok(origin) = origin.to_str() else {
                return false;
            };
            extra.iter().any(|allowed| allowed == origin)
                || is_allowed_extension(origin, &extension_ids)
        })
        .allowed_methods([Method::GET, Method::POST, Method::DELETE])
        .allowed_headers([
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("x-request-id"),
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("traceparent"),
        ])
        .expose_headers([
            header::HeaderName::from_static("x-request-id"),
            header::HeaderName::from_static(core::OVERHEAD_HEADER),
        ])
        .max_age(3600)
}

/// An extension page's origin (`chrome-extension://<id>`, …) whose id is allowed: any id when
/// none are configured.
fn is_allowed_extension(origin: &str, extension_ids: &[String]) -> bool {
    [
        "chrome-extension://",
        "moz-extension://",
        "safari-web-extension://",
    ]
    .iter()
    .filter_map(|scheme| origin.strip_prefix(scheme))
    .any(|id| extension_ids.is_empty() || extension_ids.iter().any(|allowed| allowed == id))
}

async fn not_found(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// A resource's answer to any other method: 405 with the `Allow` header RFC 9110 requires.
fn only(
    allowed: &'static str,
) -> impl Fn(HttpRequest) -> std::future::Ready<actix_web::HttpResponse> + Clone {
    move |req: HttpRequest| {
        let mut response = errors::envelope(
            actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!(
                "{} is not allowed on {} (allowed: {allowed})",
                req.method(),
                req.path()
            ),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
        std::future::ready(response)
    }
}

fn json_error(error: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let api_error = match &error {
        JsonPayloadError::ContentType => ApiError::UnsupportedMediaType(
            "the body must be JSON, sent with Content-Type: application/json".to_owned(),
        ),
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => {
            ApiError::PayloadTooLarge(format!("the body is larger than {limit} bytes"))
        }
        JsonPayloadError::Deserialize(e) => {
            ApiError::InvalidRequest(format!("invalid JSON body: {e}"))
        }
        JsonPayloadError::Payload(e) if middleware::is_body_timeout(e) => {
            ApiError::RequestTimeout("the request body did not arrive in time".to_owned())
        }
        other => ApiError::InvalidRequest(format!("cannot read the body: {other}")),
    };
    api_error.into()
}

/// A repeated parameter is refused, as a repeated key in a JSON body is ("duplicate field").
fn query_error(error: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    let message = match &error {
        QueryPayloadError::Deserialize(cause) => format!("invalid query string: {cause}"),
        other => format!("invalid query string: {other}"),
    };
    ApiError::InvalidRequest(message).into()
}

fn path_error(error: PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::InvalidRequest(format!("invalid path: {error}")).into()
}

/// Reads a JSON body into `T`, naming the field at fault when it does not fit.
fn from_body<T: serde::de::DeserializeOwned>(body: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::InvalidRequest(format!("invalid request body: {}", e.inner()))
        } else {
            ApiError::InvalidRequest(format!("{path}: {}", e.inner()))
        }
    })
}

/// Reads an optional query number, naming the parameter when it is not one.
fn parse_number<T: std::str::FromStr>(
    name: &'static str,
    value: Option<&str>,
    default: T,
) -> Result<T, ApiError> {
    match value {
        None => Ok(default),
        Some(text) => text.parse().map_err(|_| {
            ApiError::InvalidRequest(format!("{name}: {text:?} is not a valid number"))
        }),
    }
}
