//! The HTTP client behind `maestra ask`, `maestra health` and `maestra mcp`: the local backend
//! first, then — only when `MAESTRA_FALLBACK_ENABLED` — the cloud, on a refused or timed-out
//! connection or a 5xx. A 4xx is an answer, never a reason to fall back. Every result names
//! the backend that gave it.

pub mod memory;
pub mod settings;
pub mod sse;

use std::fmt;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Value, json};

pub use settings::ClientSettings;
use sse::{EventParser, StreamItem};

/// The local server is on this machine: if it does not accept within a second, it is not there.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The cloud is across the internet, behind TLS.
const CLOUD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest silence on an open request: a model may think for a while before answering.
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// `/health` never calls the model, so it answers quickly or not at all.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Sent with every ask, the same on the fallback attempt, so a server can tell a retry.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// Which backend answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Local,
    Cloud,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Cloud => "cloud",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The backend answered with an error status (its envelope's code and message).
    #[error("{backend} backend answered {status} {code}: {message}")]
    Rejected {
        backend: Backend,
        status: u16,
        code: String,
        message: String,
    },
    /// The backend began a streamed reply, then failed (an `error` event).
    #[error("{backend} backend failed while replying ({code}): {message}")]
    StreamFailed {
        backend: Backend,
        code: String,
        message: String,
    },
    /// No backend could be reached.
    #[error("{0}")]
    Unreachable(String),
    /// The exchange broke after the request was sent, or the answer was not the API's JSON.
    #[error("{backend} backend: {detail}")]
    Failed { backend: Backend, detail: String },
}

/// A message for `POST /api/maestra/core`.
#[derive(Debug, Clone)]
pub struct AskRequest<'a> {
    pub user_id: &'a str,
    pub surface_id: &'a str,
    /// `None` starts a new conversation.
    pub conversation_id: Option<&'a str>,
    pub message: &'a str,
}

/// Maestra's reply to an ask.
#[derive(Debug, Clone)]
pub struct Reply {
    pub backend: Backend,
    pub text: String,
    pub conversation_id: String,
    /// The full response object, its `backend` set to the one that answered.
    pub body: Value,
}

/// Any other JSON answer, its `backend` field set to the one that answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub backend: Backend,
    pub body: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendHealth {
    pub backend: Backend,
    pub url: String,
    /// `healthy`, `degraded`, `unreachable` or `error`.
    pub status: String,
    pub healthy: bool,
    pub version: Option<String>,
    pub mode: Option<String>,
    pub latency_ms: Option<f64>,
    /// Why it is not healthy.
    pub detail: Option<String>,
    /// The local server's sync with the cloud, as its `/health` tells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<Value>,
}

/// Both backends' health: what `maestra health --json` prints and the `maestra_health` MCP
/// tool returns, serialized from this one struct so that the two always say the same.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    pub local: BackendHealth,
    /// `None` when `MAESTRA_CLOUD_URL` is not set.
    pub cloud: Option<BackendHealth>,
    /// At least one backend is healthy (`maestra health` exits 0).
    pub any_healthy: bool,
    /// `MAESTRA_FALLBACK_ENABLED`: whether the cloud is asked when local cannot answer.
    pub fallback_enabled: bool,
}

impl HealthReport {
    fn new(local: BackendHealth, cloud: Option<BackendHealth>, fallback_enabled: bool) -> Self {
        let any_healthy = local.healthy || cloud.as_ref().is_some_and(|c| c.healthy);
        Self {
            local,
            cloud,
            any_healthy,
            fallback_enabled,
        }
    }

    pub fn any_healthy(&self) -> bool {
        self.any_healthy
    }
}

/// One backend: where it is and how to reach it.
struct Target {
    backend: Backend,
    base: Url,
    http: reqwest::Client,
    api_key: Option<SecretString>,
}

impl Target {
    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let mut request = self.http.request(method, self.endpoint(segments));
        if let Some(key) = &self.api_key
            && let Ok(mut value) = HeaderValue::from_str(key.expose_secret())
        {
            // Kept out of any debug output of the request.
            value.set_sensitive(true);
            request = request.header("X-API-Key", value);
        }
        request
    }

    /// The base URL (which may carry a path prefix) with these path segments, each encoded.
    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// The URL as shown to people: without any user name or password it may carry.
    fn shown(&self) -> String {
        let mut url = self.base.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.as_str().trim_end_matches('/').to_owned()
    }
}

pub struct MaestraClient {
    local: Target,
    cloud: Option<Target>,
    fallback_enabled: bool,
}

/// How the local attempt went wrong, kept until the fallback decides what to report.
enum LocalFailure {
    Unreachable(String),
    ServerError(Response),
}

impl MaestraClient {
    pub fn new(settings: &ClientSettings) -> anyhow::Result<Self> {
        let local = Target {
            backend: Backend::Local,
            base: settings.local_url.clone(),
            // Loopback never goes through a proxy, whatever HTTP_PROXY says.
            http: http_client(LOCAL_CONNECT_TIMEOUT).no_proxy().build()?,
            api_key: None,
        };
        let cloud = settings
            .cloud_url
            .clone()
            .map(|base| -> anyhow::Result<Target> {
                Ok(Target {
                    backend: Backend::Cloud,
                    base,
                    http: http_client(CLOUD_CONNECT_TIMEOUT).build()?,
                    api_key: settings.api_key.clone(),
                })
            })
            .transpose()?;
        Ok(Self {
            local,
            cloud,
            fallback_enabled: settings.fallback_enabled,
        })
    }

    /// Sends one message. With `on_text`, asks for a streamed reply and hands each piece over
    /// as it comes; a server that answers plain JSON instead hands over the whole reply once.
    pub async fn ask(
        &self,
        request: &AskRequest<'_>,
        idempotency_key: &str,
        on_text: Option<&mut (dyn FnMut(&str) + Send)>,
    ) -> Result<Reply, ClientError> {
        let mut body = json!({
            "user_id": request.user_id,
            "surface_id": request.surface_id,
            "message": request.message,
        });
        if let Some(id) = request.conversation_id {
            body["conversation_id"] = json!(id);
        }
        let streaming = on_text.is_some();
        if streaming {
            body["stream"] = json!(true);
        }
        let (backend, response) = self
            .send(|target| {
                let request = target
                    .request(Method::POST, &["api", "maestra", "core"])
                    .header(IDEMPOTENCY_HEADER, idempotency_key)
                    .json(&body);
                if streaming {
                    request.header(ACCEPT, "text/event-stream, application/json")
                } else {
                    request
                }
            })
            .await?;
        let body = if is_event_stream(&response) && response.status().is_success() {
            read_stream(backend, response, on_text).await?
        } else {
            let body = json_body(backend, response)
                .await
                .map_err(|e| self.with_hint(e))?;
            if let (Some(on_text), Some(text)) =
                (on_text, body.get("reply").and_then(Value::as_str))
            {
                on_text(text);
            }
            body
        };
        reply(backend, body)
    }

    /// A page of a conversation's messages, oldest first.
    pub async fn history(
        &self,
        conversation_id: &str,
        user_id: &str,
        after_seq: Option<i64>,
        limit: Option<u32>,
    ) -> Result<Answer, ClientError> {
        let mut query = vec![("user_id", user_id.to_owned())];
        query.extend(after_seq.map(|seq| ("after_seq", seq.to_string())));
        query.extend(limit.map(|n| ("limit", n.to_string())));
        let (backend, response) = self
            .send(|target| {
                target
                    .request(
                        Method::GET,
                        &["api", "maestra", "conversations", conversation_id],
                    )
                    .query(&query)
            })
            .await?;
        let body = json_body(backend, response)
            .await
            .map_err(|e| self.with_hint(e))?;
        answer(backend, body)
    }

    /// The legacy advisor: a one-off question, with optional context.
    pub async fn advisor(
        &self,
        question: &str,
        context: Option<&str>,
        user_id: Option<&str>,
        idempotency_key: &str,
    ) -> Result<Answer, ClientError> {
        let mut body = json!({ "question": question });
        if let Some(context) = context {
            body["context"] = json!(context);
        }
        if let Some(user_id) = user_id {
            body["user_id"] = json!(user_id);
        }
        let (backend, response) = self
            .send(|target| {
                target
                    .request(Method::POST, &["api", "maestra", "advisor", "ask"])
                    .header(IDEMPOTENCY_HEADER, idempotency_key)
                    .json(&body)
            })
            .await?;
        let body = json_body(backend, response)
            .await
            .map_err(|e| self.with_hint(e))?;
        answer(backend, body)
    }

    /// A cloud that refuses for want of a key says so; the client knows why.
    fn with_hint(&self, error: ClientError) -> ClientError {
        match error {
            ClientError::Rejected {
                backend: Backend::Cloud,
                status: 401,
                code,
                message,
            } if self.cloud.as_ref().is_some_and(|c| c.api_key.is_none()) => {
                ClientError::Rejected {
                    backend: Backend::Cloud,
                    status: 401,
                    code,
                    message: format!("{message}; MAESTRA_API_KEY is not set"),
                }
            }
            other => other,
        }
    }

    /// Both backends' `/health`, side by side (the cloud's only when its URL is set).
    pub async fn health(&self) -> HealthReport {
        let cloud = async {
            match &self.cloud {
                Some(target) => Some(health_of(target).await),
                None => None,
            }
        };
        let (local, cloud) = tokio::join!(health_of(&self.local), cloud);
        HealthReport::new(local, cloud, self.fallback_enabled)
    }

    /// Sends to the local backend, and to the cloud when the local one cannot answer and
    /// fallback is enabled. `build` makes the same request for either.
    async fn send(
        &self,
        build: impl Fn(&Target) -> RequestBuilder,
    ) -> Result<(Backend, Response), ClientError> {
        let local = &self.local;
        let failure = match build(local).send().await {
            Ok(response) if !response.status().is_server_error() => {
                return Ok((Backend::Local, response));
            }
            Ok(response) => LocalFailure::ServerError(response),
            Err(e) if e.is_connect() => LocalFailure::Unreachable(describe(&e)),
            // Sent, then broken: the server may have acted on it; not a reason to ask elsewhere.
            Err(e) => {
                return Err(ClientError::Failed {
                    backend: Backend::Local,
                    detail: describe(&e),
                });
            }
        };
        let cloud = match &self.cloud {
            Some(cloud) if self.fallback_enabled => cloud,
            _ => {
                return match failure {
                    LocalFailure::ServerError(response) => Ok((Backend::Local, response)),
                    LocalFailure::Unreachable(why) => Err(ClientError::Unreachable(format!(
                        "cannot reach the local backend at {} ({why}); start it with `maestra serve`{}",
                        local.shown(),
                        if self.cloud.is_some() {
                            ", or set MAESTRA_FALLBACK_ENABLED=true to use the cloud"
                        } else {
                            ", or set MAESTRA_CLOUD_URL and MAESTRA_FALLBACK_ENABLED=true to use the cloud"
                        }
                    ))),
                };
            }
        };
        tracing::info!(
            reason = match &failure {
                LocalFailure::Unreachable(why) => why.clone(),
                LocalFailure::ServerError(response) => response.status().to_string(),
            },
            "local backend unavailable; asking the cloud"
        );
        match build(cloud).send().await {
            Ok(response) => Ok((Backend::Cloud, response)),
            Err(e) => {
                let cloud_why = describe(&e);
                Err(match failure {
                    LocalFailure::Unreachable(why) => ClientError::Unreachable(format!(
                        "cannot reach the local backend at {} ({why}) nor the cloud at {} ({cloud_why})",
                        local.shown(),
                        cloud.shown()
                    )),
                    LocalFailure::ServerError(response) => {
                        match json_body(Backend::Local, response).await {
                            Err(ClientError::Rejected {
                                backend,
                                status,
                                code,
                                message,
                            }) => ClientError::Rejected {
                                backend,
                                status,
                                code,
                                message: format!(
                                    "{message}; the cloud at {} could not be reached either ({cloud_why})",
                                    cloud.shown()
                                ),
                            },
                            Err(other) => other,
                            Ok(_) => ClientError::Unreachable(format!(
                                "the cloud at {} could not be reached ({cloud_why})",
                                cloud.shown()
                            )),
                        }
                    }
                })
            }
        }
    }
}

fn http_client(connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .read_timeout(READ_TIMEOUT)
        .user_agent(concat!("maestra/", env!("CARGO_PKG_VERSION")))
}

async fn health_of(target: &Target) -> BackendHealth {
    let started = Instant::now();
    let sent = target
        .request(Method::GET, &["health"])
        .timeout(HEALTH_TIMEOUT)
        .send()
        .await;
    let mut health = BackendHealth {
        backend: target.backend,
        url: target.shown(),
        status: "unreachable".to_owned(),
        healthy: false,
        version: None,
        mode: None,
        latency_ms: None,
        detail: None,
        sync: None,
    };
    let response = match sent {
        Ok(response) => response,
        Err(e) => {
            health.detail = Some(describe(&e));
            return health;
        }
    };
    let status = response.status();
    let body: Option<Value> = response.json().await.ok();
    health.latency_ms = Some((started.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0);
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    health.version = field("version");
    health.mode = field("mode");
    health.sync = body.as_ref().and_then(|b| b.get("sync")).cloned();
    let reported = field("status");
    health.healthy = status == StatusCode::OK && reported.as_deref() == Some("healthy");
    health.status = match reported {
        Some(reported) if status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE => {
            reported
        }
        _ => "error".to_owned(),
    };
    if !health.healthy {
        health.detail = Some(match field("storage") {
            Some(storage) if storage != "ok" => format!("HTTP {status}, storage {storage}"),
            _ => format!("HTTP {status}"),
        });
    }
    health
}

fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

/// Reads a streamed reply: each `delta` handed to `on_text`, the `done` object returned.
async fn read_stream(
    backend: Backend,
    response: Response,
    mut on_text: Option<&mut (dyn FnMut(&str) + Send)>,
) -> Result<Value, ClientError> {
    let mut parser = EventParser::default();
    let mut chunks = response.bytes_stream();
    let mut done = None;
    let mut handle = |event: sse::Event| -> Result<(), ClientError> {
        match sse::interpret(&event) {
            StreamItem::Delta(text) => {
                if let Some(on_text) = on_text.as_mut() {
                    on_text(&text);
                }
            }
            StreamItem::Done(body) => done = Some(body),
            StreamItem::Error { code, message } => {
                return Err(ClientError::StreamFailed {
                    backend,
                    code,
                    message: one_line(&message),
                });
            }
            StreamItem::Other => {}
        }
        Ok(())
    };
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| ClientError::Failed {
            backend,
            detail: format!("the reply stream broke: {}", describe(&e)),
        })?;
        for event in parser.feed(&chunk) {
            handle(event)?;
        }
    }
    if let Some(event) = parser.finish() {
        handle(event)?;
    }
    done.ok_or_else(|| ClientError::Failed {
        backend,
        detail: "the reply stream ended before the reply was complete".to_owned(),
    })
}

/// The JSON body of a successful answer, or the rejection its error envelope describes.
async fn json_body(backend: Backend, response: Response) -> Result<Value, ClientError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| ClientError::Failed {
        backend,
        detail: format!("cannot read the answer: {}", describe(&e)),
    })?;
    if !status.is_success() {
        return Err(rejected(backend, status, &bytes));
    }
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Failed {
        backend,
        detail: format!("the answer ({status}) is not JSON: {e}"),
    })
}

fn rejected(backend: Backend, status: StatusCode, body: &[u8]) -> ClientError {
    let envelope: Option<Value> = serde_json::from_slice(body).ok();
    let error = envelope.as_ref().and_then(|v| v.get("error"));
    let field = |name: &str| error.and_then(|e| e.get(name)).and_then(Value::as_str);
    ClientError::Rejected {
        backend,
        status: status.as_u16(),
        code: field("code").unwrap_or("http_error").to_owned(),
        message: one_line(
            field("message")
                .or(status.canonical_reason())
                .unwrap_or("error"),
        ),
    }
}

fn reply(backend: Backend, mut body: Value) -> Result<Reply, ClientError> {
    let text = body.get("reply").and_then(Value::as_str).map(str::to_owned);
    let conversation = body
        .get("conversation_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (Some(text), Some(conversation_id)) = (text, conversation) else {
        return Err(ClientError::Failed {
            backend,
            detail: "the answer has no reply or conversation_id".to_owned(),
        });
    };
    body["backend"] = json!(backend);
    Ok(Reply {
        backend,
        text,
        conversation_id,
        body,
    })
}

fn answer(backend: Backend, mut body: Value) -> Result<Answer, ClientError> {
    match body.as_object_mut() {
        Some(object) => {
            object.insert("backend".to_owned(), json!(backend));
            Ok(Answer { backend, body })
        }
        None => Err(ClientError::Failed {
            backend,
            detail: "the answer is not a JSON object".to_owned(),
        }),
    }
}

/// Why a request failed, in a few words: the innermost cause, without the URL reqwest adds.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_owned();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    let mut innermost = None;
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                std::io::ErrorKind::TimedOut => "timed out".to_owned(),
                _ => one_line(&io.to_string()),
            };
        }
        innermost = Some(cause);
        source = cause.source();
    }
    one_line(&innermost.map_or_else(|| error.to_string(), ToString::to_string))
}

/// Error text from elsewhere, kept to one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(base: &str) -> Target {
        Target {
            backend: Backend::Cloud,
            base: Url::parse(base).unwrap(),
            http: reqwest::Client::new(),
            api_key: None,
        }
    }

    #[test]
    fn endpoints_keep_the_base_path_and_encode_each_segment() {
        assert_eq!(
            target("http://127.0.0.1:8825")
                .endpoint(&["api", "maestra", "core"])
                .as_str(),
            "http://127.0.0.1:8825/api/maestra/core"
        );
        assert_eq!(
            target("https://example.test/maestra/")
                .endpoint(&["api", "maestra", "conversations", "conv_1"])
                .as_str(),
            "https://example.test/maestra/api/maestra/conversations/conv_1"
        );
        assert_eq!(
            target("http://127.0.0.1:8825")
                .endpoint(&["api", "maestra", "conversations", "../x?y"])
                .as_str(),
            "http://127.0.0.1:8825/api/maestra/conversations/..%2Fx%3Fy"
        );
    }

    #[test]
    fn urls_are_shown_without_their_credentials() {
        assert_eq!(
            target("https://user:hunter2@example.test/").shown(),
            "https://example.test"
        );
    }

    #[test]
    fn a_rejection_carries_the_envelopes_code_and_message_on_one_line() {
        let body = br#"{"error":{"code":"payload_too_large","message":"message: too\nlarge","request_id":"r"}}"#;
        let error = rejected(Backend::Local, StatusCode::PAYLOAD_TOO_LARGE, body);
        assert_eq!(
            error.to_string(),
            "local backend answered 413 payload_too_large: message: too large"
        );
        let error = rejected(
            Backend::Cloud,
            StatusCode::BAD_GATEWAY,
            b"<html>proxy</html>",
        );
        assert_eq!(
            error.to_string(),
            "cloud backend answered 502 http_error: Bad Gateway"
        );
    }
}
