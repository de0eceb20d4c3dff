//! `Idempotency-Key`: a repeated request is answered once; a retry after a provider failure
//! continues the first attempt instead of storing the message twice. Both modes.

use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::fake_provider::{FakeProvider, Step};
use crate::helpers::{
    ServerProcess, TEST_MODEL, all_messages, priced_provider_vars, spawn_app_with_provider,
    spawn_cloud_app,
};

fn body(conversation: &str, text: &str) -> Value {
    json!({"user_id": "ana", "surface_id": "cli", "conversation_id": conversation, "message": text})
}

/// POSTs the core endpoint with an `Idempotency-Key` (and an API key in cloud mode).
async fn post(base: &str, api_key: Option<&str>, key: &str, body: &Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/api/maestra/core"))
        .header("Idempotency-Key", key)
        .json(body);
    if let Some(api_key) = api_key {
        request = request.header("X-API-Key", api_key);
    }
    request.send().await.unwrap()
}

/// The repeat gets the first answer, stores nothing, and does not call the provider again;
/// another body with the same key is a 409.
async fn repeats_are_answered_once(base: &str, api_key: Option<&str>, provider: &FakeProvider) {
    let first = post(base, api_key, "key-1", &body("conv_idem", "Hello")).await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    let again = post(base, api_key, "key-1", &body("conv_idem", "Hello")).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    for field in [
        "reply",
        "message_id",
        "seq",
        "conversation_id",
        "usage",
        "created_at",
    ] {
        assert_eq!(first[field], again[field], "{field}");
    }
    assert_eq!(provider.received().len(), 1, "the provider is called once");
    assert_eq!(all_messages(base, api_key, "conv_idem").await.len(), 2);

    let other = post(base, api_key, "key-1", &body("conv_idem", "Another text")).await;
    assert_eq!(other.status(), 409);
    let error: Value = other.json().await.unwrap();
    assert_eq!(error["error"]["code"], "idempotency_conflict");
    assert_eq!(
        all_messages(base, api_key, "conv_idem").await.len(),
        2,
        "nothing stored"
    );

    // Another key is another request.
    assert_eq!(
        post(base, api_key, "key-2", &body("conv_idem", "Hello"))
            .await
            .status(),
        200
    );
    assert_eq!(all_messages(base, api_key, "conv_idem").await.len(), 4);
}

/// The provider fails once: 502 with the message stored; the retry gets the reply and the
/// message is not stored again.
async fn a_retry_after_a_provider_failure_continues(
    base: &str,
    api_key: Option<&str>,
    provider: &FakeProvider,
) {
    let failed = post(base, api_key, "key-retry", &body("conv_retry", "Hello")).await;
    assert_eq!(failed.status(), 502);
    assert_eq!(all_messages(base, api_key, "conv_retry").await.len(), 1);

    let retried = post(base, api_key, "key-retry", &body("conv_retry", "Hello")).await;
    assert_eq!(retried.status(), 200);
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(retried["seq"], 2);
    let messages = all_messages(base, api_key, "conv_retry").await;
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant"], "one message, one reply");
    assert_eq!(provider.received().len(), 2);

    let repeat = post(base, api_key, "key-retry", &body("conv_retry", "Hello")).await;
    let repeat: Value = repeat.json().await.unwrap();
    assert_eq!(repeat["message_id"], retried["message_id"]);
    assert_eq!(provider.received().len(), 2);
}

#[tokio::test]
async fn local_repeats_are_answered_once() {
    let provider = FakeProvider::start(Step::reply("Once.")).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    repeats_are_answered_once(&app.address, None, &provider).await;
}

#[tokio::test]
async fn local_retry_after_a_provider_failure_continues() {
    let provider =
        FakeProvider::scripted(vec![Step::Status(500, None)], Step::reply("Back.")).await;
    let app =
        spawn_app_with_provider(&provider.base_url, &[("MAESTRA_LLM_MAX_RETRIES", "0")]).await;
    a_retry_after_a_provider_failure_continues(&app.address, None, &provider).await;
}

fn provider_vars(provider: &FakeProvider) -> Vec<(&str, &str)> {
    vec![
        ("MAESTRA_LLM_BASE_URL", provider.base_url.as_str()),
        ("MAESTRA_LLM_MODEL", TEST_MODEL),
        ("MAESTRA_LLM_MAX_RETRIES", "0"),
    ]
}

#[sqlx::test(migrations = false)]
async fn cloud_repeats_are_answered_once(_: PgPoolOptions, db: PgConnectOptions) {
    let provider = FakeProvider::start(Step::reply("Once.")).await;
    let app = spawn_cloud_app(&db, &provider_vars(&provider)).await;
    repeats_are_answered_once(&app.app.address, Some(&app.api_key), &provider).await;
}

#[sqlx::test(migrations = false)]
async fn cloud_retry_after_a_provider_failure_continues(_: PgPoolOptions, db: PgConnectOptions) {
    let provider =
        FakeProvider::scripted(vec![Step::Status(500, None)], Step::reply("Back.")).await;
    let app = spawn_cloud_app(&db, &provider_vars(&provider)).await;
    a_retry_after_a_provider_failure_continues(&app.app.address, Some(&app.api_key), &provider)
        .await;
}

#[tokio::test]
async fn an_unusable_idempotency_key_is_refused() {
    let provider = FakeProvider::start(Step::reply("Never.")).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let response = post(&app.address, None, "has space", &body("conv_bad", "Hello")).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    assert!(provider.received().is_empty());
}

#[tokio::test]
async fn local_keys_survive_a_restart() {
    use maestra::domain::TurnOutcome;
    use maestra::domain::{ConversationId, SurfaceId, Usage};
    use maestra::idempotency::{Begin, FileIdempotency, IdempotencyKey, IdempotencyStore};
    use maestra::store::FileStore;

    let dir = tempfile::tempdir().unwrap();
    let key = IdempotencyKey::parse("k", &json!({"message": "hi"})).unwrap();
    let outcome = TurnOutcome {
        reply: "Hello".to_owned(),
        conversation_id: ConversationId::parse("conv_k").unwrap(),
        message_id: "msg_1".to_owned(),
        seq: 2,
        surface_id: SurfaceId::parse("cli").unwrap(),
        model: "m".to_owned(),
        usage: Usage::default(),
        created_at: chrono::Utc::now(),
        provider_ms: 1.0,
    };
    let open_store = || {
        FileStore::open(
            dir.path().join("conversations"),
            &dir.path().join("journal"),
            20,
        )
        .unwrap()
    };
    {
        let store = FileIdempotency::open(&open_store()).unwrap();
        assert_eq!(store.begin("local", &key).await.unwrap(), Begin::Fresh);
        assert_eq!(store.begin("local", &key).await.unwrap(), Begin::InProgress);
        store.complete("local", &key, &outcome).await.unwrap();
    }
    // The records rode to the journal, and were written at the clean stop.
    let reopened = FileIdempotency::open(&open_store()).unwrap();
    assert_eq!(
        reopened.begin("local", &key).await.unwrap(),
        Begin::Replay(Box::new(outcome))
    );
    let other = IdempotencyKey::parse("k", &json!({"message": "other"})).unwrap();
    assert_eq!(
        reopened.begin("local", &other).await.unwrap(),
        Begin::Conflict
    );
    assert_eq!(
        reopened.begin("another-tenant", &other).await.unwrap(),
        Begin::Fresh
    );
}

/// The vars of a local server process whose provider is `provider`.
fn process_vars(provider: &FakeProvider) -> Vec<(&str, &str)> {
    let mut vars = priced_provider_vars(provider);
    vars.push(("MAESTRA_LLM_REQUEST_TIMEOUT", "60"));
    vars
}

#[tokio::test]
async fn local_a_retry_after_a_crash_stores_the_message_and_the_reply_once() {
    let data = tempfile::tempdir().unwrap();
    let request = body("conv_crash", "Hello once");

    // The server dies while the model is still answering: the user's message is stored, and
    // its key's record (which rides with the next write) may or may not be.
    let slow = FakeProvider::start(Step::Delay(
        std::time::Duration::from_secs(60),
        Box::new(Step::Reply("too late".to_owned())),
    ))
    .await;
    let mut server = ServerProcess::start(data.path(), &process_vars(&slow)).await;
    let base = server.url("");
    let pending = tokio::spawn(async move {
        post(&base, None, "crash-key", &body("conv_crash", "Hello once"))
            .await
            .status()
    });
    while slow.received().is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    server.kill_hard();
    let _ = pending.await;

    // The retry, on the restarted server, is answered; the message is there once.
    let fast = FakeProvider::start(Step::Reply("Answered.".to_owned())).await;
    let mut server = ServerProcess::start(data.path(), &process_vars(&fast)).await;
    let retried = post(&server.url(""), None, "crash-key", &request).await;
    assert_eq!(retried.status(), 200);
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(retried["reply"], "Answered.");
    let messages = all_messages(&server.url(""), None, "conv_crash").await;
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant"], "{messages:#?}");

    // Killed again right after answering, before anything else was written: the key's
    // outcome may be lost, but a repeat finds the stored reply without asking the model.
    server.kill_hard();
    let asked = fast.received().len();
    let server = ServerProcess::start(data.path(), &process_vars(&fast)).await;
    let repeated = post(&server.url(""), None, "crash-key", &request).await;
    assert_eq!(repeated.status(), 200);
    let repeated: Value = repeated.json().await.unwrap();
    assert_eq!(repeated["message_id"], retried["message_id"]);
    assert_eq!(repeated["reply"], "Answered.");
    assert_eq!(
        fast.received().len(),
        asked,
        "the model was not asked again"
    );
    assert_eq!(
        all_messages(&server.url(""), None, "conv_crash")
            .await
            .len(),
        2
    );
}
