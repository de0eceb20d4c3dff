//! `POST /api/maestra/core`: one message in, Maestra's reply out, both stored.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::caller::Caller;
use super::errors::ApiError;
use super::{AppState, request_id};
use crate::domain::{ConversationId, MessageText, SurfaceId, Usage, UserId};
use crate::metrics::Metrics;
use crate::service::{Turn, TurnOutcome};

/// The body as sent. Unknown fields are ignored.
#[derive(Deserialize)]
struct CoreRequest {
    user_id: String,
    surface_id: String,
    #[serde(default)]
    conversation_id: Option<String>,
    message: String,
}

#[derive(Serialize)]
struct CoreResponse {
    reply: String,
    conversation_id: ConversationId,
    message_id: String,
    seq: i64,
    surface_id: SurfaceId,
    model: String,
    usage: Usage,
    created_at: chrono::DateTime<chrono::Utc>,
    backend: &'static str,
}

#[utoipa::path(post, path = "/api/maestra/core", tag = "conversations",
    request_body = super::openapi::CoreRequest, responses(super::openapi::CoreResponses))]
pub async fn core(
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
    caller: Caller,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let started = std::time::Instant::now();
    let turn = parse(&state, caller, body.into_inner())?;
    let outcome = state.service.turn(turn).await?;
    let overhead = started.elapsed().saturating_sub(outcome.provider_time);
    metrics.overhead.observe(overhead.as_secs_f64());
    Ok(HttpResponse::Ok().json(respond(outcome, state.mode.as_str())))
}

fn parse(state: &AppState, caller: Caller, body: serde_json::Value) -> Result<Turn, ApiError> {
    let request: CoreRequest = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::InvalidRequest(format!("invalid request body: {}", e.inner()))
        } else {
            ApiError::InvalidRequest(format!("{path}: {}", e.inner()))
        }
    })?;
    Ok(Turn {
        owner: caller.owner(UserId::parse(&request.user_id)?),
        surface_id: SurfaceId::parse(&request.surface_id)?,
        conversation_id: request
            .conversation_id
            .as_deref()
            .map(ConversationId::parse)
            .transpose()?,
        message: MessageText::parse(request.message, state.max_message_bytes)?,
        request_id: request_id::current(),
        api_key_id: caller.api_key_id,
    })
}

fn respond(outcome: TurnOutcome, backend: &'static str) -> CoreResponse {
    CoreResponse {
        reply: outcome.reply,
        conversation_id: outcome.conversation_id,
        message_id: outcome.message_id,
        seq: outcome.seq,
        surface_id: outcome.surface_id,
        model: outcome.model,
        usage: outcome.usage,
        created_at: outcome.created_at,
        backend,
    }
}
