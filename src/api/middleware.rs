//! What wraps every request: its id, span and log line; panics turned into 500s; plain-text
//! error bodies from the framework turned into the JSON envelope; local mode's `Host` check.

use std::io;
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::Instant;

use actix_cors::CorsError;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::InternalError;
use actix_web::error::PayloadError;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage, HttpResponse, ResponseError, web};
use futures_util::FutureExt;
use prometheus::IntGauge;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::core::OVERHEAD_HEADER;
use super::errors::{ApiError, envelope};
use super::request_id;
use crate::metrics::Metrics;
use crate::responder::ProviderClock;

pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let started = Instant::now();
    if let Some(watch) = req.conn_data::<super::head_deadline::HeadWatch>() {
        watch.head_arrived();
    }
    let id = request_id::from_headers(req.headers());
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let method = req.method().clone();
    let span = tracing::info_span!(
        "http.request",
        http.method = %req.method(),
        http.route = tracing::field::Empty,
        http.status_code = tracing::field::Empty,
        request.id = %id,
        tenant.id = tracing::field::Empty,
        key.id = tracing::field::Empty,
    );
    // Continue the caller's trace (W3C traceparent) when it sent one.
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(req.headers()))
    });
    let _ = span.set_parent(parent);
    let in_flight = metrics.as_ref().map(|m| InFlight::start(&m.http_in_flight));

    let handled = async {
        // The request itself is gone once handed on, so failures without a ServiceResponse
        // travel as an error that carries its finished response.
        match AssertUnwindSafe(next.call(req)).catch_unwind().await {
            Ok(Ok(response)) => {
                let (request, response) = response.map_into_boxed_body().into_parts();
                Ok(ServiceResponse::new(request, finish(response).await))
            }
            Ok(Err(error)) => Err(finished_error(error.error_response()).await),
            Err(_panic) => {
                let error = ApiError::Internal(anyhow::anyhow!("a request handler panicked"));
                Err(finished_error(error.error_response()).await)
            }
        }
    };
    let result = request_id::scope(id, handled)
        .instrument(span.clone())
        .await;

    drop(in_flight);
    let (status, route) = match &result {
        Ok(response) => (
            response.status(),
            response
                .request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".to_owned()),
        ),
        Err(error) => (
            error.as_response_error().status_code(),
            "unmatched".to_owned(),
        ),
    };
    if let Some(metrics) = &metrics {
        let labels = [route.as_str(), method.as_str(), status.as_str()];
        metrics.http_requests.with_label_values(&labels).inc();
        metrics
            .http_duration
            .with_label_values(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
    span.record("http.route", route.as_str());
    span.record("http.status_code", status.as_u16());
    span.in_scope(|| {
        tracing::info!(
            http.status_code = status.as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request handled"
        );
    });
    result
}

async fn finished_error(response: HttpResponse) -> Error {
    let response = finish(response).await;
    InternalError::from_response("request failed", response).into()
}

/// Every response leaves with the request's id and, when it is an error, the JSON envelope.
async fn finish(response: HttpResponse) -> HttpResponse {
    let mut response = json_error_body(cors_refusal(response)).await;
    if let Ok(value) = HeaderValue::from_str(&request_id::current()) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static(request_id::HEADER), value);
    }
    response
}

/// A request body must arrive within the configured time: a client trickling bytes (a slow
/// body, slowloris-style) cannot hold a connection and its buffers for ever. The request head
/// has its own limit (actix-web's client request timeout).
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let timeout = req
        .app_data::<web::Data<super::AppState>>()
        .map(|state| state.body_timeout);
    if let Some(timeout) = timeout {
        let until = tokio::time::Instant::now() + timeout;
        let payload = req.take_payload();
        let timed = futures_util::stream::unfold(Some(payload), move |payload| async move {
            let mut payload = payload?;
            match tokio::time::timeout_at(until, futures_util::StreamExt::next(&mut payload)).await
            {
                Ok(Some(chunk)) => Some((chunk, Some(payload))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(PayloadError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the request body did not arrive in time",
                    ))),
                    None,
                )),
            }
        });
        let timed: Pin<Box<dyn futures_util::Stream<Item = Result<web::Bytes, PayloadError>>>> =
            Box::pin(timed);
        req.set_payload(Payload::from(timed));
    }
    next.call(req).await
}

/// `X-Maestra-Overhead-Ms` on every response of the routes that ask the model, errors
/// included: the request's time in the backend minus its wait for the provider. A stream's
/// headers leave before the model is done, so a stream gives it in its `done` event instead.
pub async fn overhead_header(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let clock = ProviderClock::default();
    let mut response = clock.clone().scope(next.call(req)).await?;
    let streamed = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !streamed {
        let overhead = started.elapsed().saturating_sub(clock.waited());
        if let Ok(value) = HeaderValue::from_str(&format!("{:.3}", overhead.as_secs_f64() * 1000.0))
        {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static(OVERHEAD_HEADER), value);
        }
    }
    Ok(response)
}

/// Whether a body read failed because the body was too slow.
pub fn is_body_timeout(error: &PayloadError) -> bool {
    matches!(error, PayloadError::Io(e) if e.kind() == io::ErrorKind::TimedOut)
}

/// Counts a request in flight for as long as it lives.
struct InFlight(IntGauge);

impl InFlight {
    fn start(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads W3C trace context from actix's header map.
struct HeaderExtractor<'a>(&'a actix_web::http::header::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Errors produced by the framework itself (405, a refused CORS origin, ...) have plain-text
/// bodies; give them the same JSON envelope as ours.
async fn json_error_body(response: HttpResponse) -> HttpResponse {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let headers = response.headers().clone();
    let text = actix_web::body::to_bytes(response.into_body())
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .filter(|t| !t.trim().is_empty() && t.len() <= 512);
    let message = text.unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    let mut rebuilt = envelope(status, code_for(status), message.trim());
    for (name, value) in &headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rebuilt.headers_mut().append(name.clone(), value.clone());
        }
    }
    rebuilt
}

/// actix-cors answers 400 to every CORS failure. An origin, method or header that the policy
/// refuses is a 403; only a malformed preflight is a 400.
fn cors_refusal(response: HttpResponse) -> HttpResponse {
    let refused = response
        .error()
        .and_then(|e| e.as_error::<CorsError>())
        .filter(|e| {
            matches!(
                e,
                CorsError::OriginNotAllowed
                    | CorsError::MethodNotAllowed
                    | CorsError::HeadersNotAllowed
            )
        })
        .map(|e| format!("CORS: {e}"));
    match refused {
        Some(reason) => ApiError::Forbidden(reason).error_response(),
        None => response,
    }
}

fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "storage_unavailable",
        400..=499 => "invalid_request",
        _ => "internal_error",
    }
}

/// Local mode: any web page can reach loopback, and DNS rebinding lets it do so under its own
/// host name. Only requests addressed to a loopback name (or the configured bind address) pass.
pub fn host_is_allowed(host_header: Option<&str>, bind: IpAddr) -> bool {
    let Some(host) = host_header else {
        return true; // HTTP/1.0 clients; browsers always send Host
    };
    let name = strip_port(host).to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    let bracketless = name.trim_start_matches('[').trim_end_matches(']');
    match bracketless.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || (!bind.is_unspecified() && ip == bind),
        Err(_) => false,
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

pub async fn loopback_host_only(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let bind = req.app_config().local_addr().ip();
    let host = req
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("?"));
    if host_is_allowed(host, bind) {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    let refused = ApiError::Forbidden(
        "this local server only answers requests addressed to localhost or 127.0.0.1 \
         (Host header refused)"
            .to_owned(),
    )
    .error_response();
    Ok(req.into_response(refused))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn loopback_names_are_allowed_with_or_without_a_port() {
        for host in [
            "localhost",
            "localhost:8825",
            "LOCALHOST:8825",
            "127.0.0.1:8825",
            "127.1.2.3",
            "[::1]:8825",
            "[::1]",
            "app.localhost:8825",
        ] {
            assert!(host_is_allowed(Some(host), LOOPBACK), "{host} refused");
        }
    }

    #[test]
    fn other_names_are_refused() {
        for host in [
            "evil.example",
            "evil.example:8825",
            "localhost.evil.example",
            "192.168.1.10:8825",
            "0.0.0.0:8825",
            "127.0.0.1.nip.io",
            "?",
        ] {
            assert!(!host_is_allowed(Some(host), LOOPBACK), "{host} allowed");
        }
    }

    #[test]
    fn the_configured_bind_address_is_allowed() {
        let lan: IpAddr = "192.168.1.10".parse().unwrap();
        assert!(host_is_allowed(Some("192.168.1.10:8825"), lan));
    }
}
