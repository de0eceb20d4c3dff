//! A fast fake OpenAI-compatible provider for `bench/provider.sh`: every
//! `POST /v1/chat/completions` is answered at once with the same completion and usage, so
//! that what is measured through maestra beyond a direct call is maestra's own overhead.
//!
//!     cargo run --release --example fake_provider -- [PORT] [WORKERS]
//!
//! Prints the port it listens on (127.0.0.1; PORT 0, the default, picks a free one).

use actix_web::{App, HttpResponse, HttpServer, web};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let workers: usize = args.next().and_then(|w| w.parse().ok()).unwrap_or(1);
    let completion = web::Bytes::from(
        serde_json::json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "model": "bench-model",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "A short answer from the fake provider, about as long as a typical chat reply's first sentence."},
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": 250, "completion_tokens": 25, "total_tokens": 275},
        })
        .to_string(),
    );
    let server = HttpServer::new(move || {
        let completion = completion.clone();
        App::new().route(
            "/v1/chat/completions",
            // The body is read, as a real provider would, and not looked at.
            web::post().to(move |_request: web::Bytes| {
                let completion = completion.clone();
                async move {
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(completion)
                }
            }),
        )
    })
    .workers(workers)
    .bind(("127.0.0.1", port))?;
    let port = server.addrs().first().map_or(port, |a| a.port());
    println!("{port}");
    server.run().await
}
