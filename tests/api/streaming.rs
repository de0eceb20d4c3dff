//! Streaming replies as Server-Sent Events: deltas as the provider writes, then `done`; the
//! reply stored even when the client leaves; an `error` event when the provider breaks off.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::fake_provider::{COMPLETION_TOKENS, FakeProvider, PROMPT_TOKENS, Step};
use crate::helpers::{parse_events, read_events, spawn_app, spawn_app_with_provider};

const TEXT: &str = "Streaming works piece by piece from the provider.";

fn hello(conversation: &str) -> Value {
    json!({"user_id": "ana", "surface_id": "browser_ext", "conversation_id": conversation, "message": "Hello"})
}

/// The deltas' text joined, and the events' names in order.
fn deltas_and_names(events: &[(String, Value)]) -> (String, Vec<&str>) {
    let text = events
        .iter()
        .filter(|(name, _)| name == "delta")
        .map(|(_, data)| data["text"].as_str().unwrap())
        .collect();
    (text, events.iter().map(|(name, _)| name.as_str()).collect())
}

#[tokio::test]
async fn a_stream_arrives_as_several_deltas_then_done_with_the_full_response() {
    let provider = FakeProvider::start(Step::reply(TEXT)).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;

    let response = app.post_core_streaming(&hello("conv_s")).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = read_events(response).await;
    let (text, names) = deltas_and_names(&events);
    assert!(names.len() > 3, "several deltas: {names:?}");
    assert_eq!(names.last(), Some(&"done"));
    assert!(names[..names.len() - 1].iter().all(|n| *n == "delta"));
    assert_eq!(text, TEXT);

    let done = &events.last().unwrap().1;
    assert_eq!(done["reply"], TEXT);
    assert_eq!(done["conversation_id"], "conv_s");
    assert_eq!(done["seq"], 2);
    assert_eq!(done["backend"], "local");
    assert_eq!(done["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(done["usage"]["completion_tokens"], COMPLETION_TOKENS);
    assert_eq!(done["usage"]["cost_usd"], 0.0064);
    assert!(done["overhead_ms"].as_f64().unwrap() >= 0.0);

    // The provider was asked to stream, and to count the tokens of a stream.
    let request = &provider.received()[0].body;
    assert_eq!(request["stream"], true);
    assert_eq!(request["stream_options"]["include_usage"], true);
    // The streamed reply is stored like any other.
    let messages = app.messages("ana", "conv_s").await;
    assert_eq!(messages[1]["content"], TEXT);
    assert_eq!(messages[1]["usage"]["cost_usd"], 0.0064);
}

#[tokio::test]
async fn accept_event_stream_asks_for_a_stream_too() {
    let provider = FakeProvider::start(Step::reply(TEXT)).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let response = app
        .client
        .post(format!("{}/api/maestra/core", app.address))
        .header("accept", "application/json;q=0.5, text/event-stream")
        .json(&hello("conv_accept"))
        .send()
        .await
        .unwrap();
    let events = read_events(response).await;
    let (text, names) = deltas_and_names(&events);
    assert_eq!(text, TEXT);
    assert_eq!(names.last(), Some(&"done"));
}

#[tokio::test]
async fn a_streamed_and_a_plain_call_with_the_same_tokens_cost_the_same() {
    let provider = FakeProvider::start(Step::reply(TEXT)).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let plain = app.say("ana", "cli", Some("conv_plain"), "Hello").await;
    let events = read_events(app.post_core_streaming(&hello("conv_streamed")).await).await;
    let streamed = &events.last().unwrap().1;
    assert_eq!(streamed["usage"], plain["usage"]);
}

#[tokio::test]
async fn a_provider_that_ignores_stream_true_still_gives_a_stream_in_one_piece() {
    let provider = FakeProvider::start(Step::IgnoresStream(TEXT.to_owned())).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let events = read_events(app.post_core_streaming(&hello("conv_json")).await).await;
    let (text, names) = deltas_and_names(&events);
    assert_eq!(names, ["delta", "done"]);
    assert_eq!(text, TEXT);
    assert_eq!(events[1].1["usage"]["cost_usd"], 0.0064);
}

#[tokio::test]
async fn the_offline_responder_streams_too() {
    let app = spawn_app().await;
    let events = read_events(app.post_core_streaming(&hello("conv_off")).await).await;
    let (text, names) = deltas_and_names(&events);
    assert!(names.len() > 2, "{names:?}");
    assert_eq!(events.last().unwrap().1["reply"], text);
    assert!(text.contains("no model provider is configured"));
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_still_gets_the_whole_reply_stored() {
    let provider = FakeProvider::start(Step::SlowStream(
        TEXT.to_owned(),
        Duration::from_millis(100),
    ))
    .await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;

    let response = app.post_core_streaming(&hello("conv_gone")).await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.starts_with("event: delta"), "{first}");
    drop(body); // the client goes away mid-stream

    // Another surface sees the whole reply once the provider has finished.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let messages = app.messages("ana", "conv_gone").await;
        if messages.len() == 2 {
            assert_eq!(messages[1]["role"], "assistant");
            assert_eq!(messages[1]["content"], TEXT);
            break;
        }
        assert!(Instant::now() < deadline, "the reply was never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.ledger().len(), 1, "the finished reply is in the ledger");
}

#[tokio::test]
async fn a_provider_breaking_off_midway_ends_the_stream_with_an_error_event() {
    let provider = FakeProvider::start(Step::BreakMidStream(TEXT.to_owned(), 3)).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let response = app.post_core_streaming(&hello("conv_broken")).await;
    assert_eq!(response.status(), 200);
    let events = read_events(response).await;
    let (text, names) = deltas_and_names(&events);
    assert_eq!(text, "Streaming works piece ");
    assert_eq!(names.last(), Some(&"error"), "{names:?}");
    let error = &events.last().unwrap().1["error"];
    assert_eq!(error["code"], "provider_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("your message was stored")
    );
    assert!(!error["request_id"].as_str().unwrap().is_empty());
    assert_eq!(provider.received().len(), 1, "text was sent: no retry");
    let messages = app.messages("ana", "conv_broken").await;
    assert_eq!(messages.len(), 1, "only the user's message is stored");
}

#[tokio::test]
async fn a_provider_failing_before_the_first_delta_answers_with_a_plain_error() {
    let provider = FakeProvider::start(Step::Status(500, None)).await;
    let app =
        spawn_app_with_provider(&provider.base_url, &[("MAESTRA_LLM_MAX_RETRIES", "0")]).await;
    let response = app.post_core_streaming(&hello("conv_early")).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "provider_error");
}

#[test]
fn the_test_event_parser_reads_what_the_server_writes() {
    let events = parse_events("event: delta\ndata: {\"text\":\"a\"}\n\nevent: done\ndata: {}\n\n");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].0, "delta");
}
