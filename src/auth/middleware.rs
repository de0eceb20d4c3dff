//! Cloud mode's gate in front of `/api`: an API key is required (`X-API-Key` or
//! `Authorization: Bearer`), then the key's quota is applied. Failed authentications are also
//! limited per client address, so guessing keys cannot keep argon2 busy. Both limits go
//! through the configured `RateLimiter`, so with Redis they are shared by every replica.

use std::num::NonZeroU32;
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::ServiceRequest;
use actix_web::dev::ServiceResponse;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage, HttpResponse, ResponseError, web};

use super::{AuthError, Authenticator, Principal};
use crate::api::errors::ApiError;
use crate::metrics::Metrics;
use crate::ratelimit::{
    DEFAULT_BUCKET, Decision, Policy, Quota, RateLimiter, Subject, UNVERIFIED_BUCKET, Verdict,
    retry_after_seconds,
};

/// Requests under this path count against a key's sync quota.
const SYNC_PATH: &str = "/api/maestra/sync/";
/// The bucket of a key's sync requests.
pub const SYNC_BUCKET: &str = "sync";

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

/// Failed authentications per client address (`MAESTRA_AUTH_FAILURE_LIMIT` at once, regained
/// over 60 s). While they are used up, keys not verified yet from that address get 429 before
/// argon2 runs, so guessing keys cannot keep argon2 busy; a valid key never spends them, and a
/// verified key is not held back by them.
#[derive(Debug, Clone, Copy)]
pub struct FailureQuota(pub Quota);

impl FailureQuota {
    pub fn per_minute(failures: NonZeroU32) -> Self {
        Self(Quota {
            requests: failures,
            window: Duration::from_secs(60),
        })
    }
}

pub async fn require_api_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let Some(auth) = req.app_data::<web::Data<Authenticator>>().cloned() else {
        return Err(ApiError::Internal(anyhow::anyhow!("no authenticator configured")).into());
    };
    let Some(limiter) = req.app_data::<web::Data<RateLimiter>>().cloned() else {
        return Err(ApiError::Internal(anyhow::anyhow!("no rate limiter configured")).into());
    };
    let Some(metrics) = req.app_data::<web::Data<Metrics>>().cloned() else {
        return Err(ApiError::Internal(anyhow::anyhow!("no metrics configured")).into());
    };
    let Some(failure_quota) = req.app_data::<web::Data<FailureQuota>>().map(|q| q.0) else {
        return Err(ApiError::Internal(anyhow::anyhow!("no failure quota configured")).into());
    };
    let presented = presented_key(req.headers());
    let Some(address) = req.peer_addr().map(|a| Subject::address(a.ip())) else {
        let error = ApiError::InvalidRequest("cannot tell the client's address".to_owned());
        return Ok(req.into_response(error.error_response()));
    };
    let failures = Policy {
        bucket: UNVERIFIED_BUCKET,
        quota: failure_quota,
    };
    if !presented.is_some_and(|key| auth.is_recognised(key)) {
        let decision = limiter.peek(failures, &address).await;
        if let Verdict::Limited { retry_in } = decision.verdict {
            metrics.rate_limited.with_label_values(&["address"]).inc();
            let seconds = retry_after_seconds(retry_in);
            let mut response = ApiError::RateLimited(format!(
                "too many failed authentications from this address; retry in {seconds} s"
            ))
            .error_response();
            insert_header(response.headers_mut(), header::RETRY_AFTER, seconds);
            return Ok(req.into_response(response));
        }
    }
    let outcome = match presented {
        None => Err(AuthError::Unauthorized),
        Some(key) => auth.authenticate(key).await,
    };
    let principal = match outcome {
        Ok(principal) => principal,
        Err(AuthError::Unauthorized) => {
            metrics.auth_failures.inc();
            limiter.check(failures, &address).await;
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

    // Sync has a quota of its own (a separate budget for the same key, with its own name in
    // the RateLimit headers), so an install catching up never eats the chat quota.
    let policy = match req.app_data::<web::Data<SyncQuota>>() {
        Some(sync) if req.path().starts_with(SYNC_PATH) => Policy {
            bucket: SYNC_BUCKET,
            quota: sync.0,
        },
        _ => Policy {
            bucket: DEFAULT_BUCKET,
            quota: principal.quota,
        },
    };
    let decision = limiter
        .check(policy, &Subject::key(&principal.key_id))
        .await;
    match decision.verdict {
        Verdict::Limited { retry_in } => {
            metrics.rate_limited.with_label_values(&["key"]).inc();
            let seconds = retry_after_seconds(retry_in);
            let mut response = ApiError::RateLimited(format!(
                "this key's {} of {} requests per {} s is used up; retry in {seconds} s",
                if decision.policy.bucket == SYNC_BUCKET {
                    "sync quota"
                } else {
                    "quota"
                },
                decision.policy.quota.requests,
                decision.policy.quota.window.as_secs()
            ))
            .error_response();
            set_limit_headers(response.headers_mut(), &decision);
            insert_header(response.headers_mut(), header::RETRY_AFTER, seconds);
            Ok(req.into_response(response))
        }
        Verdict::Allowed { .. } => {
            req.extensions_mut().insert(principal);
            let mut response = next.call(req).await?.map_into_boxed_body();
            set_limit_headers(response.headers_mut(), &decision);
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

/// `X-RateLimit-Limit`/`-Remaining`, and the IETF fields
/// (draft-ietf-httpapi-ratelimit-headers-10): `RateLimit-Policy: "default";q=100;w=60` and
/// `RateLimit: "default";r=<remaining>;t=<seconds until one more request is regained>`.
fn set_limit_headers(headers: &mut HeaderMap, decision: &Decision) {
    let Policy { bucket, quota } = decision.policy;
    let (remaining, more_in) = match decision.verdict {
        Verdict::Allowed { remaining, more_in } => (remaining, more_in),
        Verdict::Limited { retry_in } => (0, retry_in),
    };
    insert_header(
        headers,
        HeaderName::from_static("x-ratelimit-limit"),
        quota.requests.get(),
    );
    insert_header(
        headers,
        HeaderName::from_static("x-ratelimit-remaining"),
        remaining,
    );
    let policy = format!(
        "\"{bucket}\";q={};w={}",
        quota.requests,
        quota.window.as_secs()
    );
    let state = format!(
        "\"{bucket}\";r={remaining};t={}",
        retry_after_seconds(more_in)
    );
    for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
}

fn insert_header(headers: &mut HeaderMap, name: HeaderName, value: impl Into<u64>) {
    headers.insert(name, HeaderValue::from(value.into()));
}

/// The authenticated caller of this request, if cloud mode put one there.
pub fn principal_of(req: &actix_web::HttpRequest) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}
