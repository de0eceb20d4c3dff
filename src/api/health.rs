//! `GET /health`: is the service up and its storage usable. Never calls the model.

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

#[utoipa::path(
    get,
    path = "/health",
    tag = "service",
    responses(super::openapi::HealthResponses)
)]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let storage = state.service.store().check().await;
    let body = |status: &str, storage: &str| {
        json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "mode": state.mode.as_str(),
            "storage": storage,
            "uptime_seconds": state.started.elapsed().as_secs(),
        })
    };
    match storage {
        Ok(()) => HttpResponse::Ok().json(body("healthy", "ok")),
        Err(e) => {
            tracing::warn!(error = %e, "health check: storage unavailable");
            HttpResponse::ServiceUnavailable().json(body("degraded", "unavailable"))
        }
    }
}
