//! Sync's routes. Cloud mode: `POST /api/maestra/sync/push` and `/pull`, which local installs
//! call with their key (see `crate::sync::protocol`). Local mode: `GET /api/maestra/sync`
//! (how sync with the cloud stands) and `POST /api/maestra/sync/now` (a round now), which
//! `maestra sync status` and `now` call.

use std::time::Duration;

use actix_web::{HttpResponse, web};

use super::body::JsonObject;
use super::caller::Caller;
use super::errors::ApiError;
use super::{AppState, from_body};
use crate::domain::InvalidInput;
use crate::metrics::Metrics;
use crate::sync::SyncSide;
use crate::sync::protocol::{CLOUD_ORIGIN, MAX_RECORDS, MAX_USERS, PullRequest, PushRequest};

/// How long `POST /api/maestra/sync/now` waits for the round it asks for.
const NOW_TIMEOUT: Duration = Duration::from_secs(60);

fn no_route(path: &str) -> ApiError {
    ApiError::NotFound(format!("no route for {path} in this mode"))
}

#[utoipa::path(post, path = "/api/maestra/sync/push", tag = "sync",
    request_body = super::openapi::SyncPush, responses(super::openapi::SyncPushResponses))]
pub async fn push(
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
    caller: Caller,
    body: web::Json<JsonObject>,
) -> Result<HttpResponse, ApiError> {
    let SyncSide::Cloud(cloud) = &state.sync else {
        return Err(no_route("POST /api/maestra/sync/push"));
    };
    let request: PushRequest = from_body(body.into_inner().into_value())?;
    if request.records.len() > MAX_RECORDS {
        return Err(ApiError::PayloadTooLarge(format!(
            "records: {} in one push; send at most {MAX_RECORDS}",
            request.records.len()
        )));
    }
    if request.origin.as_str() == CLOUD_ORIGIN {
        return Err(InvalidInput::new("origin", "names the cloud itself").into());
    }
    for (i, record) in request.records.iter().enumerate() {
        record.check().map_err(|e| {
            ApiError::InvalidRequest(format!("records[{i}].{}: {}", e.field, e.reason))
        })?;
    }
    let response = cloud
        .push(&caller.tenant, caller.api_key_id.as_deref(), &request)
        .await?;
    metrics
        .sync_records
        .with_label_values(&["received"])
        .inc_by(request.records.len() as u64);
    Ok(HttpResponse::Ok().json(response))
}

#[utoipa::path(post, path = "/api/maestra/sync/pull", tag = "sync",
    request_body = super::openapi::SyncPull, responses(super::openapi::SyncPullResponses))]
pub async fn pull(
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
    caller: Caller,
    body: web::Json<JsonObject>,
) -> Result<HttpResponse, ApiError> {
    let SyncSide::Cloud(cloud) = &state.sync else {
        return Err(no_route("POST /api/maestra/sync/pull"));
    };
    let request: PullRequest = from_body(body.into_inner().into_value())?;
    let limit = request.limit.unwrap_or(MAX_RECORDS);
    if !(1..=MAX_RECORDS).contains(&limit) {
        return Err(InvalidInput::new("limit", format!("must be 1-{MAX_RECORDS}")).into());
    }
    if request.cursors.len() > MAX_USERS {
        return Err(
            InvalidInput::new("cursors", format!("at most {MAX_USERS} users in one pull")).into(),
        );
    }
    if let Some((user, _)) = request.cursors.iter().find(|(_, cursor)| **cursor < 0) {
        return Err(ApiError::InvalidRequest(format!(
            "cursors.{user}: must be 0 or more"
        )));
    }
    let response = cloud.pull(&caller.tenant, &request, limit).await?;
    metrics
        .sync_records
        .with_label_values(&["sent"])
        .inc_by(response.records.len() as u64);
    Ok(HttpResponse::Ok().json(response))
}

#[utoipa::path(
    get,
    path = "/api/maestra/sync",
    tag = "sync",
    responses(super::openapi::SyncStatusResponses)
)]
pub async fn status(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let SyncSide::Local(local) = &state.sync else {
        return Err(no_route("GET /api/maestra/sync"));
    };
    Ok(HttpResponse::Ok().json(local.status()))
}

#[utoipa::path(
    post,
    path = "/api/maestra/sync/now",
    tag = "sync",
    responses(super::openapi::SyncStatusResponses)
)]
pub async fn now(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let SyncSide::Local(local) = &state.sync else {
        return Err(no_route("POST /api/maestra/sync/now"));
    };
    Ok(HttpResponse::Ok().json(local.now(NOW_TIMEOUT).await))
}
