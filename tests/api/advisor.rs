//! The legacy advisor route: a one-off question through the same responder, not stored.

use serde_json::{Value, json};

use crate::fake_provider::{FakeProvider, Step};
use crate::helpers::{TestApp, files_under, spawn_app, spawn_app_with_provider};

async fn ask(app: &TestApp, body: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}/api/maestra/advisor/ask", app.address))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_advisor_answers_through_the_provider_with_the_context_and_stores_nothing() {
    let provider = FakeProvider::start(Step::reply("Use a feature flag.")).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let response = ask(
        &app,
        &json!({"question": "How do I ship this safely?", "context": "A Rust service", "user_id": "ana"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-maestra-overhead-ms"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["answer"], "Use a feature flag.");
    assert_eq!(body["usage"]["cost_usd"], 0.0064);

    let messages = provider.received()[0].messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].0, "system");
    assert_eq!(messages[1].0, "user");
    assert!(messages[1].1.contains("A Rust service"));
    assert!(messages[1].1.contains("How do I ship this safely?"));

    assert!(files_under(&app.conversations_dir()).is_empty());
    let ledger = app.ledger();
    assert_eq!(ledger.len(), 1, "the cost is still accounted for");
    assert_eq!(ledger[0]["surface_id"], "advisor");
    assert_eq!(ledger[0]["user_id"], "ana");
    assert!(ledger[0]["conversation_id"].is_null());
}

#[tokio::test]
async fn the_offline_advisor_answers_a_bare_question() {
    let app = spawn_app().await;
    let response = ask(&app, &json!({"question": "Anyone there?"})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["answer"].as_str().unwrap().contains("Anyone there?"));
    assert_eq!(body["model"], "maestra-offline");
    assert_eq!(app.ledger()[0]["user_id"], "anonymous");
}

#[tokio::test]
async fn a_bad_advisor_request_names_the_field() {
    let app = spawn_app().await;
    let cases = [
        (json!({}), 400, "question"),
        (json!({"question": "  "}), 400, "question"),
        (
            json!({"question": "ok", "user_id": "no spaces"}),
            400,
            "user_id",
        ),
        (
            json!({"question": "ok", "context": "x".repeat(40_000)}),
            413,
            "context",
        ),
    ];
    for (body, status, field) in cases {
        let response = ask(&app, &body).await;
        assert_eq!(response.status(), status, "{field}");
        let error: Value = response.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{field}: {message}");
    }
}

#[tokio::test]
async fn a_provider_failure_on_the_advisor_is_a_502() {
    let provider = FakeProvider::start(Step::Status(401, None)).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let response = ask(&app, &json!({"question": "Hello?"})).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "provider_error");
}
