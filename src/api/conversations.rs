//! Reading and erasing conversations: list a user's, page through one's messages, delete one.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::caller::Caller;
use super::errors::ApiError;
use super::{AppState, openapi, parse_number};
use crate::domain::{ConversationId, UserId, conversation_order};
use crate::store::Owner;
use crate::sync::SyncSide;

const DEFAULT_CONVERSATIONS: usize = 20;
const MAX_CONVERSATIONS: usize = 100;
const DEFAULT_MESSAGES: usize = 100;
const MAX_MESSAGES: usize = 1000;

/// Query parameters as text, parsed below so that errors name the parameter.
#[derive(Deserialize)]
pub struct Query {
    user_id: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
    after_seq: Option<String>,
}

impl Query {
    fn owner(&self, caller: &Caller) -> Result<Owner, ApiError> {
        let user_id = self.user_id.as_deref().ok_or_else(|| {
            ApiError::InvalidRequest("user_id: query parameter required".to_owned())
        })?;
        Ok(caller.owner(UserId::parse(user_id)?))
    }

    fn limit(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        match parse_number("limit", self.limit.as_deref(), default)? {
            n if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::InvalidRequest(format!("limit: must be 1-{max}"))),
        }
    }
}

fn conversation_id(path: &str) -> Result<ConversationId, ApiError> {
    Ok(ConversationId::parse(path)?)
}

#[utoipa::path(
    get,
    path = "/api/maestra/conversations",
    tag = "conversations",
    params(openapi::ListQuery),
    responses(openapi::ListResponses)
)]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    query: web::Query<Query>,
) -> Result<HttpResponse, ApiError> {
    let owner = query.owner(&caller)?;
    let limit = query.limit(DEFAULT_CONVERSATIONS, MAX_CONVERSATIONS)?;
    let offset: usize = parse_number("offset", query.offset.as_deref(), 0)?;
    if i64::try_from(offset).is_err() {
        return Err(ApiError::InvalidRequest("offset: too large".to_owned()));
    }
    // One more than asked tells whether another page exists.
    let mut page = state
        .service
        .store()
        .list(&owner, offset, limit + 1)
        .await?;
    let next_offset = (page.len() > limit).then_some(offset + limit);
    page.truncate(limit);
    Ok(HttpResponse::Ok().json(json!({
        "user_id": owner.user_id,
        "conversations": page,
        "next_offset": next_offset,
    })))
}

#[utoipa::path(
    get,
    path = "/api/maestra/conversations/{conversation_id}",
    tag = "conversations",
    params(openapi::ConversationPath, openapi::MessagesQuery),
    responses(openapi::MessagesResponses)
)]
pub async fn get(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    query: web::Query<Query>,
) -> Result<HttpResponse, ApiError> {
    let conversation = conversation_id(&path)?;
    let owner = query.owner(&caller)?;
    let limit = query.limit(DEFAULT_MESSAGES, MAX_MESSAGES)?;
    let after_seq: i64 = parse_number("after_seq", query.after_seq.as_deref(), 0)?;
    // What the cloud holds for it comes first, when the cloud answers at once.
    if let SyncSide::Local(sync) = &state.sync {
        sync.refresh().await;
    }
    let mut messages = state
        .service
        .store()
        .messages(&owner, &conversation, after_seq, limit + 1)
        .await?;
    // The store pages by seq (this server's arrival order, the cursor); the page is shown in
    // the conversation's order, the same on every server.
    let next_after_seq = (messages.len() > limit).then(|| messages[limit - 1].seq);
    messages.truncate(limit);
    conversation_order(&mut messages);
    Ok(HttpResponse::Ok().json(json!({
        "conversation_id": conversation,
        "user_id": owner.user_id,
        "messages": messages,
        "next_after_seq": next_after_seq,
    })))
}

#[utoipa::path(
    delete,
    path = "/api/maestra/conversations/{conversation_id}",
    tag = "conversations",
    params(openapi::ConversationPath, openapi::OwnerQuery),
    responses(openapi::DeleteResponses)
)]
pub async fn delete(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    query: web::Query<Query>,
) -> Result<HttpResponse, ApiError> {
    let conversation = conversation_id(&path)?;
    let owner = query.owner(&caller)?;
    state.service.store().delete(&owner, &conversation).await?;
    Ok(HttpResponse::Ok().json(json!({
        "conversation_id": conversation,
        "deleted": true,
    })))
}
