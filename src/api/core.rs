//! `POST /api/maestra/core`: one message in, Maestra's reply out, both stored. With
//! `"stream": true` or `Accept: text/event-stream`, the reply comes as Server-Sent Events:
//! `delta` events as the model writes, then `done` with the full response object (or `error`).

use std::convert::Infallible;
use std::time::Instant;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::body::JsonObject;
use super::caller::Caller;
use super::errors::ApiError;
use super::{AppState, request_id};
use crate::domain::TurnOutcome;
use crate::domain::{ConversationId, MessageText, SurfaceId, Usage, UserId};
use crate::idempotency::IdempotencyKey;
use crate::metrics::Metrics;
use crate::responder::{Deltas, ProviderClock};
use crate::service::{Turn, TurnError};

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
    #[serde(default)]
    stream: bool,
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
    request_body = super::openapi::CoreRequest, responses(super::openapi::CoreResponses),
    params(super::openapi::IdempotencyHeader))]
pub async fn core(
    request: HttpRequest,
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
    caller: Caller,
    body: web::Json<JsonObject>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let idempotency_key = request
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or("\u{0}").to_owned());
    let (turn, stream) = parse(
        &state,
        caller,
        idempotency_key.as_deref(),
        body.into_inner().into_value(),
    )?;
    if stream || accepts_event_stream(&request) {
        return stream_turn(state, metrics, turn, started).await;
    }
    let outcome = finished(spawn_turn(&state, turn, None).await)?;
    // The metric; the header is middleware::overhead_header's, for every response.
    overhead_ms(started, outcome.provider_ms, &metrics);
    Ok(HttpResponse::Ok().json(respond(outcome, state.mode.as_str())))
}

fn parse(
    state: &AppState,
    caller: Caller,
    idempotency_key: Option<&str>,
    body: serde_json::Value,
) -> Result<(Turn, bool), ApiError> {
    let idempotency = idempotency_key
        .map(|key| IdempotencyKey::parse(key, &body))
        .transpose()?;
    let request: CoreRequest = super::from_body(body)?;
    let turn = Turn {
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
        idempotency,
    };
    Ok((turn, request.stream))
}

fn accepts_event_stream(request: &HttpRequest) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| {
            let essence = media.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("text/event-stream")
        })
}

/// Runs the turn in a task of its own: once the user's message is accepted, the turn runs to
/// the end and its reply is stored even if the client goes away meanwhile, or the server is
/// asked to stop (it waits for its turns; see `Turns`).
fn spawn_turn(
    state: &web::Data<AppState>,
    turn: Turn,
    deltas: Option<Deltas>,
) -> JoinHandle<Result<TurnOutcome, TurnError>> {
    let turns = state.turns.clone();
    let state = state.clone();
    let work = async move {
        match deltas {
            Some(deltas) => state.service.turn_streaming(turn, deltas).await,
            None => state.service.turn(turn).await,
        }
    };
    let work = request_id::scope(request_id::current(), work).instrument(tracing::Span::current());
    let work = ProviderClock::current().scope(work);
    turns.spawn(work)
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

/// The backend's own time so far, in milliseconds; also observed as a metric.
fn overhead_ms(started: Instant, provider_ms: f64, metrics: &Metrics) -> f64 {
    let overhead = (started.elapsed().as_secs_f64() * 1000.0 - provider_ms).max(0.0);
    metrics.overhead.observe(overhead / 1000.0);
    overhead
}

/// The streamed answer. It starts once the model's first piece of text is there, so that a
/// failure before it (an unknown conversation, a provider that is down) still answers with its
/// own status and JSON error; a failure after it is an `error` event.
async fn stream_turn(
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
    turn: Turn,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    let (deltas, mut pieces) = Deltas::channel();
    let task = spawn_turn(&state, turn, Some(deltas));
    let first = pieces.recv().await;
    let backend = state.mode.as_str();
    let request_id = request_id::current();
    let last = match first {
        // The turn is over already: its error, if any, is an ordinary error response.
        None => {
            let outcome = finished(task.await)?;
            futures_util::future::Either::Left(futures_util::future::ready(done_event(
                outcome, started, backend, &metrics,
            )))
        }
        Some(_) => futures_util::future::Either::Right(last_event(
            task, started, backend, request_id, metrics,
        )),
    };
    let rest = futures_util::stream::unfold(
        pieces,
        |mut pieces: mpsc::UnboundedReceiver<String>| async move {
            pieces.recv().await.map(|piece| (piece, pieces))
        },
    );
    let events = futures_util::stream::iter(first)
        .chain(rest)
        .map(|piece| delta_event(&piece))
        .chain(futures_util::stream::once(last))
        .map(Ok::<_, Infallible>);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Proxies such as nginx would otherwise hold the events back.
        .insert_header(("x-accel-buffering", "no"))
        .streaming(events))
}

/// `done` with the response object, or `error` with the error envelope.
async fn last_event(
    task: JoinHandle<Result<TurnOutcome, TurnError>>,
    started: Instant,
    backend: &'static str,
    request_id: String,
    metrics: web::Data<Metrics>,
) -> Bytes {
    match finished(task.await) {
        Ok(outcome) => done_event(outcome, started, backend, &metrics),
        Err(error) => {
            if let ApiError::Internal(cause) = &error {
                tracing::error!(request.id = %request_id, error = format!("{cause:#}"), "stream failed");
            }
            let envelope = json!({
                "error": {"code": error.code(), "message": error.to_string(), "request_id": request_id}
            });
            event("error", &envelope)
        }
    }
}

fn done_event(
    outcome: TurnOutcome,
    started: Instant,
    backend: &'static str,
    metrics: &Metrics,
) -> Bytes {
    let overhead = overhead_ms(started, outcome.provider_ms, metrics);
    let mut body = serde_json::to_value(respond(outcome, backend)).unwrap_or_default();
    body["overhead_ms"] = json!((overhead * 1000.0).round() / 1000.0);
    event("done", &body)
}

/// A `delta` event: `{"text": ...}` serialized straight from the piece, without building a
/// JSON value first (one goes out for every piece the model writes).
fn delta_event(text: &str) -> Bytes {
    #[derive(Serialize)]
    struct Delta<'a> {
        text: &'a str,
    }
    let mut out = Vec::with_capacity(text.len() + 40);
    out.extend_from_slice(b"event: delta\ndata: ");
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &Delta { text });
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// One Server-Sent Event. JSON never holds a raw newline, so one `data:` line carries it.
fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_event_is_the_json_value_it_stands_for() {
        for text in ["word ", "a \"quote\"\nand a line\u{2028}é", ""] {
            assert_eq!(delta_event(text), event("delta", &json!({ "text": text })));
        }
    }
}
