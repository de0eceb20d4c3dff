//! Probes: `/health` (the guide's: status, version, storage), `/health/live` (the process
//! answers; touches nothing) and `/health/ready` (storage usable and not draining), so a
//! container platform can tell "restart me" from "send me no traffic". None calls the model.

use std::sync::atomic::Ordering;

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::store::StoreError;
use crate::sync::SyncSide;

#[utoipa::path(
    get,
    path = "/health",
    tag = "service",
    responses(super::openapi::HealthResponses)
)]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let storage = state.service.store().check().await;
    let body = |status: &str, storage: &str| {
        let mut body = json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "mode": state.mode.as_str(),
            "storage": storage,
            "uptime_seconds": state.started.elapsed().as_secs(),
        });
        // Local mode: how sync with the cloud stands (never a reason to be unhealthy).
        if let SyncSide::Local(sync) = &state.sync {
            let sync = sync.status();
            body["sync"] = json!({
                "state": sync.state,
                "reachable": sync.reachable,
                "pending": sync.pending,
                "last_success": sync.last_success,
            });
        }
        // Cloud mode: where quotas are decided. A degraded limiter still limits (each replica
        // at its share), so it does not make the service unhealthy or unready.
        if let Some(limiter) = &state.rate_limiter {
            body["rate_limiter"] = json!({
                "backend": limiter.backend(),
                "state": if limiter.is_degraded() { "degraded" } else { "ok" },
            });
        }
        body
    };
    match storage {
        Ok(()) => HttpResponse::Ok().json(body("healthy", "ok")),
        Err(e) => {
            tracing::warn!(error = %e, "health check: storage unusable");
            let (storage, reason) = degraded(&e);
            let mut body = body("degraded", storage);
            body["reason"] = json!(reason);
            HttpResponse::ServiceUnavailable().json(body)
        }
    }
}

/// `storage` and `reason` for a store that cannot be used: why, in words an operator acts on
/// (the details, which may name hosts or paths, stay in the log).
fn degraded(error: &StoreError) -> (&'static str, &'static str) {
    match error {
        StoreError::Full(_) => ("full", super::errors::DISK_FULL),
        _ => (
            "unavailable",
            "the conversation storage cannot be read or written; see the server's log",
        ),
    }
}

#[utoipa::path(
    get,
    path = "/health/live",
    tag = "service",
    responses((status = 200, description = "The process answers; nothing else is checked", body = super::openapi::Liveness))
)]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "alive"}))
}

#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "service",
    responses(super::openapi::ReadyResponses)
)]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.draining.load(Ordering::Relaxed) {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"status": "draining", "reason": "the server is shutting down"}));
    }
    match state.service.store().check().await {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: storage unusable");
            let reason = match e {
                StoreError::Full(_) => "storage full",
                _ => "storage unavailable",
            };
            HttpResponse::ServiceUnavailable()
                .json(json!({"status": "not_ready", "reason": reason}))
        }
    }
}
