//! The request's id: the client's `X-Request-Id` when it sent a sane one, else a new UUID.
//! Held in a task-local for the request's lifetime so that every error body and log line of
//! that request can carry it without threading it through each call.

use actix_web::http::header::HeaderMap;

pub const HEADER: &str = "x-request-id";
const MAX_LEN: usize = 128;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Runs `future` with `id` as the current request id. (Not an `async fn`: that would hold
/// `future` twice, once as its argument and once as the scope it awaits.)
pub fn scope<F: Future>(id: String, future: F) -> impl Future<Output = F::Output> {
    REQUEST_ID.scope(id, future)
}

/// The current request's id; empty outside a request.
pub fn current() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

pub fn from_headers(headers: &HeaderMap) -> String {
    headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_acceptable(id))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Printable ASCII without spaces, so a client's id cannot forge log lines or headers.
fn is_acceptable(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(id: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(
            HeaderName::from_static(HEADER),
            HeaderValue::from_str(id).unwrap(),
        );
        map
    }

    #[test]
    fn a_clients_request_id_is_kept() {
        assert_eq!(from_headers(&headers("abc-123")), "abc-123");
    }

    #[test]
    fn an_unusable_request_id_is_replaced() {
        for bad in ["", "has space", &"x".repeat(129)] {
            let id = from_headers(&headers(bad));
            assert_ne!(id, bad);
            assert!(uuid::Uuid::parse_str(&id).is_ok());
        }
    }
}
