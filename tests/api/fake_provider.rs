//! A fake OpenAI-compatible chat-completions server that each test starts on a random port:
//! real HTTP, real SSE framing (`data: {...}` events, then `data: [DONE]`), behaviour scripted
//! per request, and a record of every request it received.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::web::{self, Bytes};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{Value, json};

/// The usage the fake reports for every reply.
pub const PROMPT_TOKENS: u64 = 1200;
pub const COMPLETION_TOKENS: u64 = 340;
/// The fake reports the requested model with this suffix, as OpenAI reports dated snapshots.
pub const MODEL_SUFFIX: &str = "-2026-01-01";

/// What the fake does with one request.
#[derive(Clone, Debug)]
pub enum Step {
    /// A reply with `PROMPT_TOKENS` / `COMPLETION_TOKENS` of usage; streamed word by word when
    /// the request asks to stream (usage only if it asked for it with `stream_options`).
    Reply(String),
    /// Like `Reply`, pausing between the streamed pieces.
    SlowStream(String, Duration),
    /// Streams this many pieces of the reply, then breaks the connection.
    BreakMidStream(String, usize),
    /// An error status, with `Retry-After` when given, and an OpenAI-style error body.
    Status(u16, Option<&'static str>),
    /// Waits, then does the next step.
    Delay(Duration, Box<Step>),
    /// 200 with a body that is not JSON.
    Malformed,
    /// A plain JSON completion even when the request asks to stream, as some servers do.
    IgnoresStream(String),
}

impl Step {
    pub fn reply(text: &str) -> Self {
        Step::Reply(text.to_owned())
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub body: Value,
    pub authorization: Option<String>,
}

impl Received {
    /// The chat messages it carried, as (role, content).
    pub fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .map(|messages| {
                messages
                    .iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or_default().to_owned(),
                            m["content"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct State {
    script: Mutex<VecDeque<Step>>,
    then: Step,
    received: Mutex<Vec<Received>>,
}

pub struct FakeProvider {
    /// What `MAESTRA_LLM_BASE_URL` is set to: the server's address with `/v1`.
    pub base_url: String,
    state: web::Data<State>,
}

impl FakeProvider {
    /// A provider that answers every request with `step`.
    pub async fn start(step: Step) -> Self {
        Self::scripted(Vec::new(), step).await
    }

    /// A provider that follows `script`, one step per request, then answers with `then`.
    pub async fn scripted(script: Vec<Step>, then: Step) -> Self {
        let state = web::Data::new(State {
            script: Mutex::new(script.into()),
            then,
            received: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .route("/v1/chat/completions", web::post().to(chat))
        })
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        tokio::spawn(server);
        FakeProvider {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            state,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

async fn chat(state: web::Data<State>, request: HttpRequest, body: Bytes) -> HttpResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.received.lock().unwrap().push(Received {
        body: body.clone(),
        authorization: request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    let step = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| state.then.clone());
    answer(step, &body).await
}

async fn answer(mut step: Step, request: &Value) -> HttpResponse {
    while let Step::Delay(delay, next) = step {
        tokio::time::sleep(delay).await;
        step = *next;
    }
    let model = format!(
        "{}{MODEL_SUFFIX}",
        request["model"].as_str().unwrap_or("fake")
    );
    let streaming = request["stream"] == true;
    let include_usage = request["stream_options"]["include_usage"] == true;
    match step {
        Step::Status(status, retry_after) => {
            let mut response =
                HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
            if let Some(seconds) = retry_after {
                response.insert_header(("retry-after", seconds));
            }
            response.json(json!({"error": {"message": "the fake provider failed", "type": "fake"}}))
        }
        Step::Malformed => HttpResponse::Ok()
            .content_type("application/json")
            .body("{\"choices\": [oops"),
        Step::IgnoresStream(text)
        | Step::Reply(text)
        | Step::SlowStream(text, _)
        | Step::BreakMidStream(text, _)
            if !streaming =>
        {
            HttpResponse::Ok().json(json!({
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage(),
            }))
        }
        Step::IgnoresStream(text) => HttpResponse::Ok().json(json!({
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage(),
        })),
        Step::Reply(text) => stream(&model, &text, include_usage, Duration::ZERO, None),
        Step::SlowStream(text, gap) => stream(&model, &text, include_usage, gap, None),
        // Paced, so that the pieces are on the wire before the connection breaks.
        Step::BreakMidStream(text, after) => stream(
            &model,
            &text,
            include_usage,
            Duration::from_millis(30),
            Some(after),
        ),
        Step::Delay(..) => unreachable!("delays are taken above"),
    }
}

fn usage() -> Value {
    json!({
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    })
}

/// The reply word by word as chat-completion chunks, then the finish, the usage (if asked
/// for) and `[DONE]`; or, with `break_after`, a connection broken after that many pieces.
fn stream(
    model: &str,
    text: &str,
    include_usage: bool,
    gap: Duration,
    break_after: Option<usize>,
) -> HttpResponse {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events: Vec<Result<Bytes, std::io::Error>> = vec![Ok(sse(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )))];
    for (i, piece) in text.split_inclusive(' ').enumerate() {
        if break_after == Some(i) {
            events.push(Err(std::io::Error::other("the fake breaks the stream")));
            break;
        }
        events.push(Ok(sse(&chunk(json!({"content": piece}), Value::Null))));
    }
    if break_after.is_none() {
        events.push(Ok(sse(&chunk(json!({}), json!("stop")))));
        if include_usage {
            events.push(Ok(sse(
                &json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage()}),
            )));
        }
        events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    }
    let events = futures_util::stream::unfold(
        (VecDeque::from(events), true),
        move |(mut events, first)| async move {
            if !first && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            let event = events.pop_front()?;
            Some((event, (events, false)))
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(events)
}

fn sse(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}
