//! The OpenAI-compatible chat-completions provider: OpenAI, OpenRouter, Ollama, vLLM,
//! llama.cpp's server, LM Studio. `POST {base_url}/chat/completions`, with or without
//! streaming; usage read from the provider's answer and priced from the configured table.
//!
//! One reply has one time budget (`request_timeout`): every attempt, the backoff between them
//! and the whole stream fit in it, so the caller hears back within it whatever happens.
//! A 429, a 5xx or a failed connection is retried (`max_retries`) with exponential backoff,
//! honouring `Retry-After`; a stream is only retried before its first piece was forwarded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures_util::StreamExt;
use reqwest::header::{self, HeaderMap};
use reqwest::{Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use thread_local::ThreadLocal;
use tokio::time::Instant;

use super::pricing::PriceTable;
use super::sse::SseParser;
use super::{Deltas, Prompt, Reply, Responder, ResponderError};
use crate::config::ProviderSettings;
use crate::domain::{Message, Role, Usage};

/// The first retry waits about this long; each further one twice as long.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// A provider's answer larger than this is refused rather than held in memory.
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// How much of a provider's error message goes to the log.
const ERROR_DETAIL_CHARS: usize = 200;

pub struct OpenAiResponder {
    /// One client (and so one connection pool) per thread: a pooled connection is driven by
    /// the runtime that opened it, and each actix worker runs its own, so a shared pool makes
    /// one worker's request wait for the other worker's thread.
    clients: ThreadLocal<reqwest::Client>,
    connect_timeout: Duration,
    endpoint: String,
    api_key: Option<SecretString>,
    model: String,
    system_prompt: String,
    request_timeout: Duration,
    max_retries: u32,
    prices: PriceTable,
    warned_no_usage: AtomicBool,
}

fn build_client(connect_timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .user_agent(concat!("maestra/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot set up the HTTP client for the model provider")
}

/// Why one attempt failed.
enum Failure {
    /// A 429, a 5xx or a broken connection, before anything was forwarded: worth another try.
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Anything else: a 4xx, an unreadable answer, a stream that broke after forwarding text.
    Final(ResponderError),
}

impl Failure {
    fn provider(reason: impl Into<String>) -> Self {
        Failure::Final(ResponderError::Provider(reason.into()))
    }
}

impl OpenAiResponder {
    pub fn new(settings: &ProviderSettings) -> anyhow::Result<Self> {
        let clients = ThreadLocal::new();
        // Built once here so a client that cannot be set up fails at start, not per request.
        clients.get_or_try(|| build_client(settings.connect_timeout))?;
        Ok(Self {
            clients,
            connect_timeout: settings.connect_timeout,
            endpoint: format!("{}/chat/completions", settings.base_url),
            api_key: settings.api_key.clone(),
            model: settings.model.clone(),
            system_prompt: settings.system_prompt.trim().to_owned(),
            request_timeout: settings.request_timeout,
            max_retries: settings.max_retries,
            prices: PriceTable::new(settings.prices.clone()),
            warned_no_usage: AtomicBool::new(false),
        })
    }

    /// The chat-completions request: the persona, then the history, oldest first.
    fn request_body(&self, prompt: &Prompt<'_>, stream: bool) -> serde_json::Value {
        let system = (!self.system_prompt.is_empty())
            .then(|| json!({"role": "system", "content": self.system_prompt}));
        let history = alternating(prompt.history)
            .into_iter()
            .map(|(role, content)| {
                let role = match role {
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                json!({"role": role, "content": content})
            });
        let messages: Vec<_> = system.into_iter().chain(history).collect();
        let mut body = json!({"model": self.model, "messages": messages, "stream": stream});
        if stream {
            // Without this, streamed answers carry no token counts to price.
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }

    #[tracing::instrument(
        name = "llm.call",
        skip_all,
        fields(llm.model = %self.model, llm.stream = deltas.is_some(), llm.attempts)
    )]
    async fn call(
        &self,
        prompt: Prompt<'_>,
        deltas: Option<&Deltas>,
    ) -> Result<Reply, ResponderError> {
        let deadline = Instant::now() + self.request_timeout;
        let body = serde_json::to_vec(&self.request_body(&prompt, deltas.is_some()))
            .map_err(|e| ResponderError::Provider(format!("cannot encode the request: {e}")))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            tracing::Span::current().record("llm.attempts", attempt);
            let outcome = tokio::time::timeout_at(deadline, self.attempt(&body, deltas)).await;
            let (reason, retry_after) = match outcome {
                Err(_elapsed) => {
                    tracing::warn!(
                        timeout_ms = self.request_timeout.as_millis() as u64,
                        "the model provider did not answer in time"
                    );
                    return Err(ResponderError::Timeout);
                }
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(Failure::Final(error))) => return Err(error),
                Ok(Err(Failure::Retryable {
                    reason,
                    retry_after,
                })) => (reason, retry_after),
            };
            let delay = retry_after.unwrap_or_else(|| backoff(attempt));
            if attempt > self.max_retries || Instant::now() + delay >= deadline {
                return Err(ResponderError::Provider(reason));
            }
            tracing::warn!(
                llm.attempt = attempt,
                retry_in_ms = delay.as_millis() as u64,
                %reason,
                "model provider call failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, body: &[u8], deltas: Option<&Deltas>) -> Result<Reply, Failure> {
        let client = self
            .clients
            .get_or_try(|| build_client(self.connect_timeout))
            .map_err(|e| Failure::provider(format!("{e:#}")))?;
        let mut request = client
            .post(&self.endpoint)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        if deltas.is_some() {
            request = request.header(header::ACCEPT, "text/event-stream");
        }
        let response = request.send().await.map_err(connection_failure)?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let detail = error_detail(response).await;
            tracing::warn!(
                http.status_code = status.as_u16(),
                provider.message = %detail,
                "the model provider answered with an error"
            );
            let reason = format!("it answered HTTP {}", status.as_u16());
            return Err(
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    Failure::Retryable {
                        reason,
                        retry_after,
                    }
                } else {
                    Failure::provider(reason)
                },
            );
        }
        let json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        match deltas {
            None => self.read_completion(response).await,
            // A server that ignores "stream": its whole answer is the one piece.
            Some(deltas) if json => {
                let reply = self.read_completion(response).await?;
                deltas.send(&reply.text);
                Ok(reply)
            }
            Some(deltas) => self.read_stream(response, deltas).await,
        }
    }

    async fn read_completion(&self, mut response: Response) -> Result<Reply, Failure> {
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(connection_failure)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(Failure::provider("its answer was too large"));
            }
            body.extend_from_slice(&chunk);
        }
        let completion: Completion = serde_json::from_slice(&body).map_err(|e| {
            tracing::warn!(error = %e, "the model provider's answer is not a chat completion");
            Failure::provider("its answer could not be read (not a chat completion)")
        })?;
        let text = completion
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.message.content)
            .ok_or_else(|| Failure::provider("its answer holds no text"))?;
        Ok(self.finish(text, completion.model, completion.usage))
    }

    async fn read_stream(&self, response: Response, deltas: &Deltas) -> Result<Reply, Failure> {
        let mut parser = SseParser::default();
        let mut body = response.bytes_stream();
        let (mut text, mut model, mut usage) = (String::new(), None, None);
        let (mut received, mut finished, mut done) = (0, false, false);
        while !done {
            let Some(chunk) = body.next().await else {
                break;
            };
            let chunk = chunk.map_err(|e| {
                if text.is_empty() {
                    connection_failure(e)
                } else {
                    tracing::warn!(error = %e, "the model provider's stream broke off");
                    Failure::provider("its stream broke off midway")
                }
            })?;
            received += chunk.len();
            if received > MAX_ANSWER_BYTES {
                return Err(Failure::provider("its answer was too large"));
            }
            let events = parser.feed(&chunk).map_err(|e| {
                tracing::warn!(error = %e, "the model provider's stream holds an oversized event");
                Failure::provider("its stream could not be read (an event too large)")
            })?;
            for data in events {
                if data.trim() == "[DONE]" {
                    done = true;
                    break;
                }
                let event: StreamChunk = serde_json::from_str(&data).map_err(|e| {
                    tracing::warn!(error = %e, "unreadable event in the model provider's stream");
                    Failure::provider("its stream could not be read")
                })?;
                if event.error.is_some() {
                    return Err(Failure::provider("it reported an error mid-stream"));
                }
                model = event.model.or(model);
                usage = event.usage.or(usage);
                for choice in event.choices {
                    if let Some(piece) = choice.delta.and_then(|d| d.content) {
                        deltas.send(&piece);
                        text.push_str(&piece);
                    }
                    finished |= choice.finish_reason.is_some();
                }
            }
        }
        if !done && !finished {
            return Err(Failure::provider(
                "its stream ended before the reply was complete",
            ));
        }
        Ok(self.finish(text, model, usage))
    }

    /// The reply, with its tokens as the provider counted them, priced.
    fn finish(&self, text: String, model: Option<String>, usage: Option<ApiUsage>) -> Reply {
        let model = model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| self.model.clone());
        let usage = usage.unwrap_or_else(|| {
            if !self.warned_no_usage.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    llm.model = %model,
                    "the model provider reports no token usage: tokens and cost are recorded as 0"
                );
            }
            ApiUsage::default()
        });
        let cost_usd = self.prices.cost_usd(
            &[&self.model, &model],
            usage.prompt_tokens,
            usage.completion_tokens,
        );
        Reply {
            text,
            model,
            usage: Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                cost_usd,
            },
        }
    }
}

#[async_trait]
impl Responder for OpenAiResponder {
    async fn reply(&self, prompt: Prompt<'_>) -> Result<Reply, ResponderError> {
        self.call(prompt, None).await
    }

    async fn reply_streaming(
        &self,
        prompt: Prompt<'_>,
        deltas: &Deltas,
    ) -> Result<Reply, ResponderError> {
        self.call(prompt, Some(deltas)).await
    }
}

/// The history as strictly alternating turns starting with the user's, which some servers'
/// chat templates (Mistral, Gemma on vLLM or llama.cpp) demand: a window may start with a reply,
/// and a failed call leaves two user messages in a row. Neighbours of one role are joined.
fn alternating(history: &[Message]) -> Vec<(Role, String)> {
    let mut turns: Vec<(Role, String)> = Vec::with_capacity(history.len());
    for message in history.iter().skip_while(|m| m.role != Role::User) {
        match turns.last_mut() {
            Some((role, content)) if *role == message.role => {
                content.push_str("\n\n");
                content.push_str(&message.content);
            }
            _ => turns.push((message.role, message.content.clone())),
        }
    }
    turns
}

/// A failure of the connection itself (refused, reset, connect timeout): worth a retry.
fn connection_failure(error: reqwest::Error) -> Failure {
    let reason = if error.is_connect() {
        "could not connect to it"
    } else {
        "the connection to it failed"
    };
    // The URL is configuration, not a secret; the error's source chain says what went wrong.
    let mut cause = String::new();
    let mut source = std::error::Error::source(&error);
    while let Some(e) = source {
        cause = e.to_string();
        source = e.source();
    }
    tracing::warn!(error = %error, cause = %cause, "model provider connection failed");
    Failure::Retryable {
        reason: reason.to_owned(),
        retry_after: None,
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from APIs and is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Capped so that a silly value cannot overflow; the time budget bounds it anyway.
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)))
}

/// Exponential backoff with jitter (between half and all of the step), so that clients
/// hit by the same outage do not retry in lockstep.
fn backoff(attempt: u32) -> Duration {
    let step = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let jitter = f64::from(uuid::Uuid::new_v4().as_u128() as u16) / f64::from(u16::MAX);
    step.mul_f64(0.5 + jitter / 2.0)
}

/// The provider's own error message, shortened, for the log (it is not shown to clients).
async fn error_detail(response: Response) -> String {
    let Ok(body) = response.bytes().await else {
        return String::new();
    };
    let body = &body[..body.len().min(16 * 1024)];
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .and_then(|m| m.as_str().map(str::to_owned))
        })
        .unwrap_or_default();
    message.chars().take(ERROR_DETAIL_CHARS).collect()
}

#[derive(Deserialize)]
struct Completion {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<CompletionChoice>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    message: CompletionMessage,
}

#[derive(Deserialize)]
struct CompletionMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct StreamChunk {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<StreamChoice>,
    usage: Option<ApiUsage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct StreamChoice {
    delta: Option<StreamDelta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct StreamDelta {
    content: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ApiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: i64, role: Role, content: &str) -> Message {
        Message {
            id: format!("msg_{seq}"),
            seq,
            role,
            surface_id: crate::domain::SurfaceId::parse("cli").unwrap(),
            content: content.to_owned(),
            created_at: chrono::Utc::now(),
            model: None,
            usage: None,
            origin: None,
        }
    }

    #[test]
    fn the_history_sent_alternates_and_starts_with_the_user() {
        let history = [
            message(4, Role::Assistant, "cut-off reply"),
            message(5, Role::User, "a"),
            message(6, Role::User, "b"),
            message(7, Role::Assistant, "answer"),
            message(8, Role::User, "c"),
        ];
        assert_eq!(
            alternating(&history),
            [
                (Role::User, "a\n\nb".to_owned()),
                (Role::Assistant, "answer".to_owned()),
                (Role::User, "c".to_owned()),
            ]
        );
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        for attempt in 1..=3 {
            let step = BACKOFF_BASE * (1 << (attempt - 1));
            let delay = backoff(attempt);
            assert!(delay >= step / 2 && delay <= step, "{attempt}: {delay:?}");
        }
        assert!(backoff(40) <= BACKOFF_MAX);
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }

    /// A provider that answers a stream whose first line never ends: the reply fails as the
    /// provider's error (502 at the API) once the line passes the parser's limit, long before
    /// the answer's.
    #[tokio::test]
    async fn a_stream_line_that_never_ends_is_the_providers_error() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let provider = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            // Once the client gives up reading, writing fails, at the latest after this.
            socket
                .set_write_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            // The request: its head, then as many bytes as its Content-Length says.
            let mut request = Vec::new();
            let mut buffer = [0; 4096];
            let (head, body) = loop {
                let n = socket.read(&mut buffer).unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&buffer[..n]);
                if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                    break (head, request.len() - end - 4);
                }
            };
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let mut left = length.saturating_sub(body);
            while left > 0 {
                left -= socket.read(&mut buffer).unwrap();
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: ")
                .unwrap();
            let piece = [b'a'; 64 << 10];
            let mut sent = 0;
            while socket.write_all(&piece).is_ok() && sent < MAX_ANSWER_BYTES {
                sent += piece.len();
            }
        });
        let responder = OpenAiResponder::new(&ProviderSettings {
            base_url: format!("http://{address}/v1"),
            api_key: None,
            model: "m".into(),
            system_prompt: String::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_retries: 0,
            prices: Default::default(),
        })
        .unwrap();
        let history = [message(1, Role::User, "hi")];
        let prompt = Prompt {
            conversation_id: None,
            history: &history,
        };
        let (deltas, _pieces) = Deltas::channel();
        let error = responder
            .reply_streaming(prompt, &deltas)
            .await
            .unwrap_err();
        drop(responder);
        assert!(
            matches!(&error, ResponderError::Provider(reason) if reason.contains("an event too large")),
            "{error:?}"
        );
        // Joined off the runtime, which goes on closing the connection meanwhile.
        tokio::task::spawn_blocking(move || provider.join().unwrap())
            .await
            .unwrap();
    }
}
