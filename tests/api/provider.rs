//! The OpenAI-compatible provider, against a fake one over real HTTP: replies, history, cost,
//! retries, timeouts and failures.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_provider::{COMPLETION_TOKENS, FakeProvider, MODEL_SUFFIX, PROMPT_TOKENS, Step};
use crate::helpers::{TEST_LLM_API_KEY, TEST_MODEL, TestApp, spawn_app_with_provider};

/// What the fake's usage costs at the test price (2.5 / 10 USD per million tokens).
fn expected_cost() -> f64 {
    (PROMPT_TOKENS as f64 * 2.5 + COMPLETION_TOKENS as f64 * 10.0) / 1e6
}

fn hello(conversation: &str) -> Value {
    json!({"user_id": "ana", "surface_id": "cli", "conversation_id": conversation, "message": "Hello"})
}

/// Asserts a provider failure's envelope, and that the user's message is the one stored.
async fn assert_failed_with_message_stored(
    app: &TestApp,
    response: reqwest::Response,
    status: u16,
    code: &str,
) {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("your message was stored"), "{message}");
    let messages = app.messages("ana", "conv_fail").await;
    assert_eq!(messages.len(), 1, "only the user's message is stored");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "Hello");
    assert!(app.ledger().is_empty(), "no answer, no ledger line");
}

#[tokio::test]
async fn the_reply_usage_and_cost_come_from_the_provider_and_the_price_table() {
    let provider = FakeProvider::start(Step::reply("Hi Ana, I am the fake model.")).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;

    let response = app.post_core(&hello("conv_a")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reply"], "Hi Ana, I am the fake model.");
    assert_eq!(body["model"], format!("{TEST_MODEL}{MODEL_SUFFIX}"));
    assert_eq!(body["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(body["usage"]["completion_tokens"], COMPLETION_TOKENS);
    assert_eq!(body["usage"]["cost_usd"], expected_cost());
    assert_eq!(expected_cost(), 0.0064);

    // The same figures on the stored reply and in the ledger.
    let messages = app.messages("ana", "conv_a").await;
    assert_eq!(messages[1]["content"], "Hi Ana, I am the fake model.");
    assert_eq!(messages[1]["usage"], body["usage"]);
    let ledger = app.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0]["cost_usd"], expected_cost());
    assert_eq!(ledger[0]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(ledger[0]["model"], body["model"]);

    // What the provider was sent: the model, the key, the persona first, then the message.
    let received = provider.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body["model"], TEST_MODEL);
    assert_eq!(received[0].body["stream"], false);
    assert_eq!(
        received[0].authorization.as_deref(),
        Some(format!("Bearer {TEST_LLM_API_KEY}").as_str())
    );
    let messages = received[0].messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].0, "system");
    assert!(messages[0].1.contains("Maestra"));
    assert_eq!(messages[1], ("user".to_owned(), "Hello".to_owned()));
}

#[tokio::test]
async fn the_second_turn_sends_the_first_turns_messages_whichever_surface_wrote_them() {
    let provider =
        FakeProvider::scripted(vec![Step::reply("First answer.")], Step::reply("Second.")).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    app.say("ana", "browser_ext", Some("conv_h"), "From the browser")
        .await;
    app.say("ana", "cli", Some("conv_h"), "From the terminal")
        .await;

    let received = provider.received();
    assert_eq!(received.len(), 2);
    let second: Vec<(String, String)> = received[1].messages().into_iter().skip(1).collect();
    let pair = |role: &str, content: &str| (role.to_owned(), content.to_owned());
    assert_eq!(
        second,
        [
            pair("user", "From the browser"),
            pair("assistant", "First answer."),
            pair("user", "From the terminal"),
        ]
    );
}

#[tokio::test]
async fn the_history_sent_is_bounded_by_messages_and_characters() {
    let provider = FakeProvider::start(Step::reply("ok")).await;
    let app = spawn_app_with_provider(
        &provider.base_url,
        &[
            ("MAESTRA_HISTORY_MESSAGES", "3"),
            ("MAESTRA_HISTORY_CHARS", "50"),
        ],
    )
    .await;
    for text in ["one", "two", "three"] {
        app.say("ana", "cli", Some("conv_w"), text).await;
    }
    // Three messages at most.
    let third = provider.received()[2].messages();
    let history: Vec<&str> = third[1..].iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(history, ["two", "ok", "three"]);

    // A long message leaves room for one short reply within 50 characters, and a reply
    // cannot open the history: only the long message goes.
    let long = "x".repeat(45);
    app.say("ana", "cli", Some("conv_w"), &long).await;
    let fourth = provider.received()[3].messages();
    let history: Vec<&str> = fourth[1..].iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(history, [long.as_str()]);
}

#[tokio::test]
async fn a_429_is_retried_after_the_time_the_provider_asks_for() {
    let provider =
        FakeProvider::scripted(vec![Step::Status(429, Some("1"))], Step::reply("Finally.")).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let started = Instant::now();
    let body = app.say("ana", "cli", Some("conv_r"), "Hello").await;
    assert_eq!(body["reply"], "Finally.");
    assert_eq!(provider.received().len(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured ({:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_provider_that_keeps_failing_answers_502_after_the_configured_retries() {
    let provider = FakeProvider::start(Step::Status(500, None)).await;
    let app =
        spawn_app_with_provider(&provider.base_url, &[("MAESTRA_LLM_MAX_RETRIES", "2")]).await;
    let response = app.post_core(&hello("conv_fail")).await;
    assert_failed_with_message_stored(&app, response, 502, "provider_error").await;
    assert_eq!(provider.received().len(), 3, "one call and two retries");
}

#[tokio::test]
async fn a_5xx_then_success_is_retried_with_backoff() {
    let provider = FakeProvider::scripted(
        vec![Step::Status(503, None), Step::Status(502, None)],
        Step::reply("Back."),
    )
    .await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let body = app.say("ana", "cli", Some("conv_b"), "Hello").await;
    assert_eq!(body["reply"], "Back.");
    assert_eq!(provider.received().len(), 3);
}

#[tokio::test]
async fn a_client_error_from_the_provider_is_not_retried() {
    let provider = FakeProvider::start(Step::Status(400, None)).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let response = app.post_core(&hello("conv_fail")).await;
    assert_failed_with_message_stored(&app, response, 502, "provider_error").await;
    assert_eq!(provider.received().len(), 1);
}

#[tokio::test]
async fn malformed_json_from_the_provider_is_a_502() {
    let provider = FakeProvider::start(Step::Malformed).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let response = app.post_core(&hello("conv_fail")).await;
    assert_failed_with_message_stored(&app, response, 502, "provider_error").await;
    assert_eq!(provider.received().len(), 1, "garbage is not retried");
}

#[tokio::test]
async fn a_slow_provider_answers_504_within_the_request_timeout() {
    let slow = Step::Delay(Duration::from_secs(10), Box::new(Step::reply("too late")));
    let provider = FakeProvider::start(slow).await;
    let app = spawn_app_with_provider(
        &provider.base_url,
        &[("MAESTRA_LLM_REQUEST_TIMEOUT", "0.5")],
    )
    .await;
    let started = Instant::now();
    let response = app.post_core(&hello("conv_fail")).await;
    let elapsed = started.elapsed();
    assert_failed_with_message_stored(&app, response, 504, "provider_timeout").await;
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn a_provider_that_is_down_answers_502_within_the_configured_timeout() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base_url = format!("http://127.0.0.1:{port}/v1");
    let app = spawn_app_with_provider(&base_url, &[("MAESTRA_LLM_REQUEST_TIMEOUT", "3")]).await;
    let started = Instant::now();
    let response = app.post_core(&hello("conv_fail")).await;
    let elapsed = started.elapsed();
    assert_failed_with_message_stored(&app, response, 502, "provider_error").await;
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn an_unpriced_model_costs_nothing() {
    let provider = FakeProvider::start(Step::reply("Free.")).await;
    let app = spawn_app_with_provider(
        &provider.base_url,
        &[
            ("MAESTRA_LLM_MODEL", "model-without-a-price"),
            ("MAESTRA_LLM_PRICE_INPUT", ""),
            ("MAESTRA_LLM_PRICE_OUTPUT", ""),
        ],
    )
    .await;
    let body = app.say("ana", "cli", Some("conv_free"), "Hello").await;
    assert_eq!(body["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(body["usage"]["cost_usd"], 0.0);
}

#[tokio::test]
async fn the_overhead_header_leaves_out_the_providers_time() {
    let provider = FakeProvider::start(Step::Delay(
        Duration::from_millis(300),
        Box::new(Step::reply("Considered.")),
    ))
    .await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let started = Instant::now();
    let response = app.post_core(&hello("conv_o")).await;
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(response.status(), 200);
    let overhead: f64 = response
        .headers()
        .get("x-maestra-overhead-ms")
        .expect("the overhead header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(total_ms >= 300.0);
    assert!(
        (0.0..200.0).contains(&overhead),
        "overhead {overhead} ms of {total_ms} ms"
    );
}

#[tokio::test]
async fn the_guides_cost_sum_equals_the_sum_of_the_responses_costs() {
    let provider = FakeProvider::start(Step::reply("A reply in several words.")).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let mut costs = Vec::new();
    for i in 0..3 {
        let body = app
            .say("ana", "cli", Some("conv_sum"), &format!("q{i}"))
            .await;
        costs.push(body["usage"]["cost_usd"].as_f64().unwrap());
    }
    for i in 0..2 {
        let response = app
            .post_core_streaming(&hello(&format!("conv_sum_stream{i}")))
            .await;
        let events = crate::helpers::read_events(response).await;
        let (_, done) = events.last().unwrap();
        costs.push(done["usage"]["cost_usd"].as_f64().unwrap());
    }
    // `jq '.cost_usd'` reads each line's cost_usd; awk adds them up in order.
    let ledger: Vec<f64> = app
        .ledger()
        .iter()
        .map(|line| line["cost_usd"].as_f64().unwrap())
        .collect();
    assert_eq!(ledger.len(), 5);
    let sum = |values: &[f64]| values.iter().sum::<f64>();
    assert_eq!(sum(&ledger), sum(&costs));
    assert!((sum(&ledger) - 5.0 * expected_cost()).abs() < 1e-12);
}
