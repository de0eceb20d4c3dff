//! Cloud mode's gate in front of `/api`: an API key is required (`X-API-Key` or
//! `Authorization: Bearer`), then the key's quota is applied. Unverified keys are also limited
//! per client address, so guessing keys cannot keep argon2 busy.

use std::net::IpAddr;
use std::sync::Arc;

use actix_governor::governor::NotUntil;
use actix_governor::governor::clock::{Clock, DefaultClock, QuantaInstant};
use actix_governor::{KeyExtractor, SimpleKeyExtractionError};
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::ServiceRequest;
use actix_web::dev::ServiceResponse;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage, HttpResponse, HttpResponseBuilder, ResponseError, web};

use super::{AuthError, Authenticator, Principal};
use crate::api::errors::ApiError;
use crate::metrics::Metrics;
use crate::ratelimit::{Decision, KeyRateLimiter, Quota, retry_after_seconds};

/// Requests under this path count against a key's sync quota.
const SYNC_PATH: &str = "/api/maestra/sync/";

/// Each key's quota for sync requests (cloud mode).
#[derive(Debug, Clone, Copy)]
pub struct SyncQuota(pub Quota);

/// The key a client presented, from either header.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim()).filter(|k| !k.is_empty());
    }
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

pub async fn require_api_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let Some(auth) = req.app_data::<web::Data<Authenticator>>().cloned() else {
        return Err(ApiError::Internal(anyhow::anyhow!("no authenticator configured")).into());
    };
    let Some(limiter) = req.app_data::<web::Data<KeyRateLimiter>>().cloned() else {
        return Err(ApiError::Internal(anyhow::anyhow!("no rate limiter configured")).into());
    };
    let Some(metrics) = req.app_data::<web::Data<Metrics>>().cloned() else {
        return Err(ApiError::Internal(anyhow::anyhow!("no metrics configured")).into());
    };
    let outcome = match presented_key(req.headers()) {
        None => Err(AuthError::Unauthorized),
        Some(key) => auth.authenticate(key).await,
    };
    let principal = match outcome {
        Ok(principal) => principal,
        Err(AuthError::Unauthorized) => {
            metrics.auth_failures.inc();
            tracing::info!("authentication failed");
            return Ok(req.into_response(unauthorized()));
        }
        Err(AuthError::Unavailable(reason)) => {
            tracing::warn!(%reason, "key store unavailable");
            let error = ApiError::StorageUnavailable(
                "the key store is unavailable; try again shortly".to_owned(),
            );
            return Ok(req.into_response(error.error_response()));
        }
        Err(AuthError::Other(e)) => {
            return Ok(req.into_response(ApiError::Internal(e).error_response()));
        }
    };
    tracing::Span::current().record("tenant.id", principal.tenant_id.as_str());
    tracing::Span::current().record("key.id", principal.key_id.as_str());

    // Sync has a quota of its own, so an install catching up never eats the chat quota.
    let (bucket, quota, what) = match req.app_data::<web::Data<SyncQuota>>() {
        Some(sync) if req.path().starts_with(SYNC_PATH) => {
            (principal.key_id.for_bucket("sync"), sync.0, "sync quota")
        }
        _ => (principal.key_id.clone(), principal.quota, "quota"),
    };
    match limiter.check(&bucket, quota) {
        Decision::Limited { limit, retry_after } => {
            metrics.rate_limited.with_label_values(&["key"]).inc();
            let seconds = retry_after_seconds(retry_after);
            let mut response = ApiError::RateLimited(format!(
                "this key's {what} of {limit} requests per {} s is used up; retry in {seconds} s",
                quota.window.as_secs()
            ))
            .error_response();
            set_limit_headers(response.headers_mut(), limit, 0);
            insert_header(response.headers_mut(), header::RETRY_AFTER, seconds);
            Ok(req.into_response(response))
        }
        Decision::Allowed { limit, remaining } => {
            req.extensions_mut().insert(principal);
            let mut response = next.call(req).await?.map_into_boxed_body();
            set_limit_headers(response.headers_mut(), limit, remaining);
            Ok(response)
        }
    }
}

fn unauthorized() -> HttpResponse {
    let mut response = ApiError::invalid_api_key().error_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn set_limit_headers(headers: &mut HeaderMap, limit: u32, remaining: u32) {
    insert_header(headers, HeaderName::from_static("x-ratelimit-limit"), limit);
    insert_header(
        headers,
        HeaderName::from_static("x-ratelimit-remaining"),
        remaining,
    );
}

fn insert_header(headers: &mut HeaderMap, name: HeaderName, value: impl Into<u64>) {
    headers.insert(name, HeaderValue::from(value.into()));
}

/// actix-governor key for attempts with a key not verified yet: the client's address. Known,
/// verified keys are let through (their own quota applies after authentication).
#[derive(Clone)]
pub struct UnverifiedByAddress {
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
}

impl KeyExtractor for UnverifiedByAddress {
    /// `None` for requests with a recognised key (whitelisted), else the peer address.
    type Key = Option<IpAddr>;
    type KeyExtractionError = SimpleKeyExtractionError<&'static str>;

    fn extract(&self, req: &ServiceRequest) -> Result<Self::Key, Self::KeyExtractionError> {
        if presented_key(req.headers()).is_some_and(|key| self.auth.is_recognised(key)) {
            return Ok(None);
        }
        req.peer_addr()
            .map(|addr| Some(addr.ip()))
            .ok_or_else(|| SimpleKeyExtractionError::new("cannot tell the client's address"))
    }

    fn exceed_rate_limit_response(
        &self,
        negative: &NotUntil<QuantaInstant>,
        _response: HttpResponseBuilder,
    ) -> HttpResponse {
        self.metrics
            .rate_limited
            .with_label_values(&["address"])
            .inc();
        let seconds = retry_after_seconds(negative.wait_time_from(DefaultClock::default().now()));
        let mut response = ApiError::RateLimited(format!(
            "too many attempts with unverified API keys from this address; retry in {seconds} s"
        ))
        .error_response();
        insert_header(response.headers_mut(), header::RETRY_AFTER, seconds);
        response
    }

    fn whitelisted_keys(&self) -> Vec<Self::Key> {
        vec![None]
    }
}

/// The authenticated caller of this request, if cloud mode put one there.
pub fn principal_of(req: &actix_web::HttpRequest) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}
