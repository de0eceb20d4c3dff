//! `POST /api/maestra/advisor/ask`: the legacy advisor. A one-off question, with optional
//! context, answered by the same responder as the core endpoint. It belongs to no conversation
//! and nothing of it is stored, except its line in the cost ledger.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::body::JsonObject;
use super::caller::Caller;
use super::errors::ApiError;
use super::{AppState, request_id};
use crate::domain::{MessageText, UserId, is_blank};
use crate::service::Question;

/// Whose question it is in the ledger when the client does not say.
const ANONYMOUS: &str = "anonymous";

#[derive(Deserialize)]
struct AskRequest {
    question: String,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
}

#[utoipa::path(post, path = "/api/maestra/advisor/ask", tag = "conversations",
    request_body = super::openapi::AdvisorQuestion, responses(super::openapi::AdvisorResponses))]
pub async fn ask(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<JsonObject>,
) -> Result<HttpResponse, ApiError> {
    let question = parse(&state, caller, body.into_inner().into_value())?;
    let answer = state.service.ask(question).await?;
    Ok(HttpResponse::Ok().json(json!({
        "answer": answer.answer,
        "model": answer.model,
        "usage": answer.usage,
        "created_at": answer.created_at,
        "backend": state.mode.as_str(),
    })))
}

fn parse(state: &AppState, caller: Caller, body: serde_json::Value) -> Result<Question, ApiError> {
    let request: AskRequest = super::from_body(body)?;
    let max = state.max_message_bytes;
    let question = text("question", request.question, max)?;
    let context = match request.context {
        Some(context) if !is_blank(&context) => Some(text("context", context, max)?),
        _ => None,
    };
    let combined = match context {
        Some(context) => format!("Context:\n{context}\n\nQuestion:\n{question}"),
        None => question,
    };
    let user_id = request.user_id.as_deref().unwrap_or(ANONYMOUS);
    Ok(Question {
        tenant: caller.tenant,
        user_id: UserId::parse(user_id)?,
        text: MessageText::parse(combined, 2 * max + 64)?,
        request_id: request_id::current(),
    })
}

/// A field's text: not blank, and within the message size limit.
fn text(field: &str, value: String, max_bytes: usize) -> Result<String, ApiError> {
    if is_blank(&value) {
        return Err(ApiError::InvalidRequest(format!(
            "{field}: must not be blank"
        )));
    }
    if value.len() > max_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "{field}: larger than the limit of {max_bytes} bytes"
        )));
    }
    Ok(value)
}
