//! A slow fake OpenAI-compatible provider for `bench/inflight.sh`: every
//! `POST /v1/chat/completions` waits DELAY_MS before its first byte, then writes its reply in
//! CHUNKS pieces INTERVAL_MS apart, as a real model does, so that thousands of turns are in
//! flight at once through maestra.
//!
//!     cargo run --release --example slow_provider -- [PORT] [WORKERS] [DELAY_MS] [CHUNKS] [INTERVAL_MS]
//!
//! Defaults: 0 (a free port), 1 worker, 200 ms, 21 chunks, 50 ms. With `"stream": true` in the
//! request the answer is `text/event-stream`: `chat.completion.chunk` events (`data: {...}`),
//! the last one carrying `usage`, then `data: [DONE]`. Otherwise it waits
//! DELAY_MS + CHUNKS × INTERVAL_MS and answers one `chat.completion` with usage. Prints the port
//! it listens on (127.0.0.1).

use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use futures_util::stream;

#[derive(Clone, Copy)]
struct Pace {
    delay: Duration,
    chunks: usize,
    interval: Duration,
}

const PIECE: &str = "word ";

fn chunk_event(index: usize, last: bool) -> web::Bytes {
    let mut event = serde_json::json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "model": "bench-model",
        "choices": [{
            "index": 0,
            "delta": if index == 0 {
                serde_json::json!({"role": "assistant", "content": PIECE})
            } else {
                serde_json::json!({"content": PIECE})
            },
            "finish_reason": if last { serde_json::json!("stop") } else { serde_json::Value::Null },
        }],
    });
    if last {
        event["usage"] = usage(index + 1);
    }
    web::Bytes::from(format!("data: {event}\n\n"))
}

fn usage(chunks: usize) -> serde_json::Value {
    serde_json::json!({"prompt_tokens": 250, "completion_tokens": chunks, "total_tokens": 250 + chunks})
}

async fn completions(pace: web::Data<Pace>, request: web::Bytes) -> HttpResponse {
    let streamed = serde_json::from_slice::<serde_json::Value>(&request)
        .ok()
        .and_then(|body| body.get("stream").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    let pace = **pace;
    if !streamed {
        tokio::time::sleep(pace.delay + pace.interval * pace.chunks as u32).await;
        let completion = serde_json::json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "model": "bench-model",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": PIECE.repeat(pace.chunks)},
                "finish_reason": "stop",
            }],
            "usage": usage(pace.chunks),
        });
        return HttpResponse::Ok()
            .content_type("application/json")
            .body(completion.to_string());
    }
    // Before the first byte (headers included) as a provider thinking before it writes.
    tokio::time::sleep(pace.delay).await;
    let chunks = pace.chunks.max(1);
    let events = stream::unfold(0usize, move |index| async move {
        if index > chunks {
            return None;
        }
        if index > 0 {
            tokio::time::sleep(pace.interval).await;
        }
        let bytes = if index == chunks {
            web::Bytes::from_static(b"data: [DONE]\n\n")
        } else {
            chunk_event(index, index + 1 == chunks)
        };
        Some((Ok::<_, std::io::Error>(bytes), index + 1))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(events)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut next = |default: u64| {
        args.next()
            .and_then(|a| a.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let port = u16::try_from(next(0)).unwrap_or(0);
    let workers = usize::try_from(next(1)).unwrap_or(1);
    let pace = Pace {
        delay: Duration::from_millis(next(200)),
        chunks: usize::try_from(next(21)).unwrap_or(21),
        interval: Duration::from_millis(next(50)),
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(pace))
            .route("/v1/chat/completions", web::post().to(completions))
    })
    .workers(workers)
    // Thousands of turns in flight: actix's defaults (25,000 connections per worker, a
    // backlog of 2,048) are raised so that the provider is never the one refusing.
    .backlog(16_384)
    .max_connections(100_000)
    .bind(("127.0.0.1", port))?;
    let port = server.addrs().first().map_or(port, |a| a.port());
    println!("{port}");
    server.run().await
}
