//! The one mapping from failures to HTTP: `{"error": {"code", "message", "request_id"}}`.
//!
//! Each variant's doc names its status. Unexpected failures become an opaque 500, logged once
//! here with their cause chain; their details never leave the server.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use super::request_id;
use crate::domain::{InvalidInput, MessageTextError};
use crate::responder::ResponderError;
use crate::service::TurnError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; the message names the field.
    #[error("{0}")]
    InvalidRequest(String),
    /// 401: the credentials are missing or not valid (for API keys: one answer for missing,
    /// unknown, wrong, revoked and expired).
    #[error("{0}")]
    Unauthorized(String),
    /// 403: refused whoever asks (e.g. a non-loopback `Host` in local mode).
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such route, or no such conversation for this user.
    #[error("{0}")]
    NotFound(String),
    /// 408: the request body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// 409: the `Idempotency-Key` was used with another body, or its request is still running.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// 413: the body or the message is larger than allowed.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: the body is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: over the key's quota (or too many unverified attempts); see `Retry-After`.
    #[error("{0}")]
    RateLimited(String),
    /// 502: the model provider failed.
    #[error("{0}")]
    Provider(String),
    /// 503: storage cannot be reached; retry later.
    #[error("{0}")]
    StorageUnavailable(String),
    /// 504: the model provider did not answer in time.
    #[error("{0}")]
    ProviderTimeout(String),
    /// 507: the disk holding the conversations is full (local mode); retry once space is freed.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 500: anything unexpected.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::IdempotencyConflict(_) => "idempotency_conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Provider(_) => "provider_error",
            ApiError::StorageUnavailable(_) => "storage_unavailable",
            ApiError::ProviderTimeout(_) => "provider_timeout",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::Internal(_) => "internal_error",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::IdempotencyConflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Provider(_) => StatusCode::BAD_GATEWAY,
            ApiError::StorageUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::ProviderTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) = self {
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        envelope(self.status_code(), self.code(), &self.to_string())
    }
}

/// The error body every failure uses, with the current request's id.
pub fn envelope(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({
        "error": {
            "code": code,
            "message": message,
            "request_id": request_id::current(),
        }
    }))
}

impl ApiError {
    /// The one 401 for API keys, whatever was wrong with the key.
    pub fn invalid_api_key() -> Self {
        ApiError::Unauthorized(
            "a valid API key is required (X-API-Key: <key> or Authorization: Bearer <key>)"
                .to_owned(),
        )
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        ApiError::InvalidRequest(e.to_string())
    }
}

impl From<MessageTextError> for ApiError {
    fn from(e: MessageTextError) -> Self {
        match e {
            MessageTextError::Invalid(e) => e.into(),
            MessageTextError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("conversation not found".to_owned()),
            StoreError::Unavailable(reason) => {
                tracing::warn!(%reason, "storage unavailable");
                ApiError::StorageUnavailable(
                    "conversation storage is unavailable; try again shortly".to_owned(),
                )
            }
            StoreError::Full(reason) => {
                tracing::warn!(%reason, "storage full");
                ApiError::InsufficientStorage(format!(
                    "{DISK_FULL}; nothing of this request was stored"
                ))
            }
            StoreError::Other(e) => ApiError::Internal(e),
        }
    }
}

/// What a client is told when the disk is full.
pub const DISK_FULL: &str =
    "the disk holding the conversations is full: free some space, then retry";

impl From<TurnError> for ApiError {
    fn from(e: TurnError) -> Self {
        match e {
            TurnError::Store(e) => e.into(),
            TurnError::ReplyNotStored {
                source,
                conversation_id,
                seq,
            } => {
                let stored = format!(
                    "your message was stored (conversation {conversation_id}, seq {seq}), the reply was not"
                );
                match ApiError::from(source) {
                    ApiError::InsufficientStorage(_) => {
                        ApiError::InsufficientStorage(format!("{DISK_FULL}; {stored}"))
                    }
                    ApiError::StorageUnavailable(message) => {
                        ApiError::StorageUnavailable(format!("{message}; {stored}"))
                    }
                    other => other,
                }
            }
            TurnError::IdempotencyConflict(message) => ApiError::IdempotencyConflict(message),
            TurnError::Responder { ref source, .. } => match source {
                ResponderError::Timeout => ApiError::ProviderTimeout(e.to_string()),
                ResponderError::Provider(_) => ApiError::Provider(e.to_string()),
            },
        }
    }
}

/// The legacy advisor's failures: nothing was stored, so there is nothing more to say.
impl From<ResponderError> for ApiError {
    fn from(e: ResponderError) -> Self {
        match e {
            ResponderError::Timeout => ApiError::ProviderTimeout(e.to_string()),
            ResponderError::Provider(_) => ApiError::Provider(e.to_string()),
        }
    }
}
