//! `POST /api/maestra/core`: one message in, Maestra's reply out, both stored.

use std::time::Instant;

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::errors::ApiError;
use super::{AppState, request_id};
use crate::domain::{ConversationId, MessageText, SurfaceId, Usage, UserId};
use crate::service::{Turn, TurnError, TurnOutcome};
use crate::store::Owner;

/// The backend's own time for a request: its duration minus the time spent waiting for the
/// model provider, in milliseconds.
pub const OVERHEAD_HEADER: &str = "x-maestra-overhead-ms";

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

pub async fn core(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let turn = parse(&state, body.into_inner())?;
    let outcome = finished(spawn_turn(&state, turn).await)?;
    let overhead = overhead_ms(started, outcome.provider_ms);
    Ok(HttpResponse::Ok()
        .insert_header((OVERHEAD_HEADER, format!("{overhead:.3}")))
        .json(respond(outcome, state.mode.as_str())))
}

fn parse(state: &AppState, body: serde_json::Value) -> Result<Turn, ApiError> {
    let request: CoreRequest = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::InvalidRequest(format!("invalid request body: {}", e.inner()))
        } else {
            ApiError::InvalidRequest(format!("{path}: {}", e.inner()))
        }
    })?;
    Ok(Turn {
        owner: Owner {
            tenant: state.tenant.clone(),
            user_id: UserId::parse(&request.user_id)?,
        },
        surface_id: SurfaceId::parse(&request.surface_id)?,
        conversation_id: request
            .conversation_id
            .as_deref()
            .map(ConversationId::parse)
            .transpose()?,
        message: MessageText::parse(request.message, state.max_message_bytes)?,
        request_id: request_id::current(),
    })
}

/// Runs the turn in a task of its own: once the user's message is accepted, the turn runs to
/// the end and its reply is stored even if the client goes away meanwhile.
fn spawn_turn(
    state: &web::Data<AppState>,
    turn: Turn,
) -> JoinHandle<Result<TurnOutcome, TurnError>> {
    let state = state.clone();
    let work = async move { state.service.turn(turn).await };
    let work = request_id::scope(request_id::current(), work).instrument(tracing::Span::current());
    tokio::spawn(work)
}

fn finished(
    joined: Result<Result<TurnOutcome, TurnError>, tokio::task::JoinError>,
) -> Result<TurnOutcome, ApiError> {
    match joined {
        Ok(outcome) => Ok(outcome?),
        Err(e) => Err(ApiError::Internal(anyhow::anyhow!(
            "the turn's task failed: {e}"
        ))),
    }
}

fn overhead_ms(started: Instant, provider_ms: f64) -> f64 {
    (started.elapsed().as_secs_f64() * 1000.0 - provider_ms).max(0.0)
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
