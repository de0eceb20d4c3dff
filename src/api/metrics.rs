//! `GET /metrics` in the Prometheus text format. Open in local mode (loopback only); in cloud
//! mode only for `Authorization: Bearer $MAESTRA_METRICS_TOKEN`, and off without that token.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use secrecy::ExposeSecret;

use super::AppState;
use super::errors::ApiError;
use crate::config::Mode;
use crate::metrics::Metrics;

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses(super::openapi::MetricsResponses)
)]
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
) -> Result<HttpResponse, ApiError> {
    if state.mode == Mode::Cloud {
        let Some(token) = &state.metrics_token else {
            return Err(ApiError::Forbidden(
                "metrics are off in cloud mode: set MAESTRA_METRICS_TOKEN on the server, then \
                 send Authorization: Bearer <token>"
                    .to_owned(),
            ));
        };
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !same_text(sent.trim(), token.expose_secret()) {
            return Err(ApiError::Unauthorized(
                "send Authorization: Bearer <MAESTRA_METRICS_TOKEN>".to_owned(),
            ));
        }
    }
    let body = metrics
        .render()
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot render metrics: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body))
}

/// Compares without stopping at the first difference.
fn same_text(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
