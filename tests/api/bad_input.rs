//! Every kind of bad request gets a clear JSON error, and nothing of it is stored.

use serde_json::{Value, json};

use crate::helpers::{TestApp, files_under, spawn_app};

struct Snapshot {
    files: Vec<std::path::PathBuf>,
    ledger: String,
}

fn snapshot(app: &TestApp) -> Snapshot {
    Snapshot {
        files: files_under(app.data_dir.path()),
        ledger: std::fs::read_to_string(app.data_dir.path().join("maestra_metrics.jsonl")).unwrap(),
    }
}

fn assert_nothing_stored(app: &TestApp, before: &Snapshot, case: &str) {
    let after = snapshot(app);
    assert_eq!(after.files, before.files, "{case}: a file was created");
    assert_eq!(after.ledger, before.ledger, "{case}: the ledger grew");
}

async fn assert_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
    mentions: &str,
    case: &str,
) {
    assert_eq!(response.status(), status, "{case}");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response
        .json()
        .await
        .unwrap_or_else(|_| panic!("{case}: body is not JSON"));
    assert_eq!(body["error"]["code"], code, "{case}: {body}");
    assert_eq!(body["error"]["request_id"], request_id, "{case}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(mentions),
        "{case}: {message:?} should mention {mentions:?}"
    );
}

#[tokio::test]
async fn bad_core_bodies_are_rejected_naming_the_problem() {
    let app = spawn_app().await;
    let before = snapshot(&app);
    let valid = json!({"user_id": "ana", "surface_id": "cli", "message": "hi"});
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let cases: Vec<(&str, Value, u16, &str, &str)> = vec![
        (
            "missing user_id",
            without("user_id"),
            400,
            "invalid_request",
            "user_id",
        ),
        (
            "missing surface_id",
            without("surface_id"),
            400,
            "invalid_request",
            "surface_id",
        ),
        (
            "missing message",
            without("message"),
            400,
            "invalid_request",
            "message",
        ),
        (
            "user_id not a string",
            with("user_id", json!(5)),
            400,
            "invalid_request",
            "user_id",
        ),
        (
            "empty user_id",
            with("user_id", json!("")),
            400,
            "invalid_request",
            "user_id",
        ),
        (
            "user_id with a space",
            with("user_id", json!("a b")),
            400,
            "invalid_request",
            "user_id",
        ),
        (
            "surface_id too long",
            with("surface_id", json!("s".repeat(129))),
            400,
            "invalid_request",
            "surface_id",
        ),
        (
            "blank message",
            with("message", json!("  \n ")),
            400,
            "invalid_request",
            "message",
        ),
        (
            "oversize message",
            with("message", json!("x".repeat(32 * 1024 + 1))),
            413,
            "payload_too_large",
            "message",
        ),
        (
            "huge body",
            with("message", json!("x".repeat(300 * 1024))),
            413,
            "payload_too_large",
            "larger",
        ),
        (
            "conversation_id ../",
            with("conversation_id", json!("../escape")),
            400,
            "invalid_request",
            "conversation_id",
        ),
        (
            "conversation_id /",
            with("conversation_id", json!("a/b")),
            400,
            "invalid_request",
            "conversation_id",
        ),
        (
            "conversation_id NUL",
            with("conversation_id", json!("conv\u{0}x")),
            400,
            "invalid_request",
            "conversation_id",
        ),
        (
            "conversation_id dot",
            with("conversation_id", json!("..")),
            400,
            "invalid_request",
            "conversation_id",
        ),
        (
            "not an object",
            json!(["a"]),
            400,
            "invalid_request",
            "expected a JSON object",
        ),
    ];
    for (case, body, status, code, mentions) in cases {
        let response = app.post_core(&body).await;
        assert_error(response, status, code, mentions, case).await;
        assert_nothing_stored(&app, &before, case);
    }
}

#[tokio::test]
async fn malformed_json_and_wrong_content_types_are_rejected() {
    let app = spawn_app().await;
    let before = snapshot(&app);
    let url = format!("{}/api/maestra/core", app.address);
    let send = |content_type: Option<&'static str>, body: &'static str| {
        let mut request = app.client.post(&url).body(body);
        if let Some(ct) = content_type {
            request = request.header("Content-Type", ct);
        }
        request.send()
    };
    let valid = r#"{"user_id":"ana","surface_id":"cli","message":"hi"}"#;

    let response = send(Some("application/json"), r#"{"user_id": "ana", "#)
        .await
        .unwrap();
    assert_error(response, 400, "invalid_request", "JSON", "truncated JSON").await;
    let response = send(Some("text/plain"), valid).await.unwrap();
    assert_error(
        response,
        415,
        "unsupported_media_type",
        "application/json",
        "text/plain",
    )
    .await;
    let response = send(Some("application/x-www-form-urlencoded"), "user_id=ana")
        .await
        .unwrap();
    assert_error(
        response,
        415,
        "unsupported_media_type",
        "application/json",
        "form",
    )
    .await;
    let response = send(None, valid).await.unwrap();
    assert_error(
        response,
        415,
        "unsupported_media_type",
        "application/json",
        "no content type",
    )
    .await;
    assert_nothing_stored(&app, &before, "bad bodies");
}

#[tokio::test]
async fn a_foreign_host_header_is_refused() {
    let app = spawn_app().await;
    let before = snapshot(&app);
    for host in ["evil.example", "evil.example:8825", "192.168.1.20:8825"] {
        let response = app
            .client
            .post(format!("{}/api/maestra/core", app.address))
            .header("Host", host)
            .json(&json!({"user_id": "ana", "surface_id": "cli", "message": "hi"}))
            .send()
            .await
            .unwrap();
        assert_error(response, 403, "forbidden", "Host", host).await;
    }
    assert_nothing_stored(&app, &before, "foreign host");
    let allowed = app
        .client
        .get(format!("{}/health", app.address))
        .header("Host", "localhost:8825")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
}

#[tokio::test]
async fn another_users_conversation_is_not_found_and_untouched() {
    let app = spawn_app().await;
    app.say("ana", "cli", Some("conv_ana"), "private").await;
    let file = app.conversations_dir().join("conv_ana.json");
    let before = snapshot(&app);
    let content_before = std::fs::read_to_string(&file).unwrap();

    let response = app
        .post_core(&json!({"user_id": "mallory", "surface_id": "cli", "conversation_id": "conv_ana", "message": "let me in"}))
        .await;
    assert_error(
        response,
        404,
        "not_found",
        "not found",
        "continue another's",
    )
    .await;
    let response = app
        .get("/api/maestra/conversations/conv_ana?user_id=mallory")
        .await;
    assert_error(response, 404, "not_found", "not found", "read another's").await;
    let response = app
        .delete("/api/maestra/conversations/conv_ana?user_id=mallory")
        .await;
    assert_error(response, 404, "not_found", "not found", "delete another's").await;
    let listed: Value = app
        .get("/api/maestra/conversations?user_id=mallory")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["conversations"], json!([]));

    assert_nothing_stored(&app, &before, "another user's");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), content_before);
}

#[tokio::test]
async fn bad_query_parameters_are_rejected_naming_them() {
    let app = spawn_app().await;
    app.say("ana", "cli", Some("conv_q"), "hi").await;
    let cases = [
        ("/api/maestra/conversations", "user_id"),
        ("/api/maestra/conversations?user_id=a%20b", "user_id"),
        ("/api/maestra/conversations?user_id=ana&limit=0", "limit"),
        ("/api/maestra/conversations?user_id=ana&limit=ten", "limit"),
        ("/api/maestra/conversations?user_id=ana&offset=-1", "offset"),
        (
            "/api/maestra/conversations?user_id=ana&offset=9223372036854775808",
            "offset",
        ),
        (
            "/api/maestra/conversations/conv_q?user_id=ana&after_seq=x",
            "after_seq",
        ),
        (
            "/api/maestra/conversations/conv_q?user_id=ana&limit=5000",
            "limit",
        ),
        (
            "/api/maestra/conversations/conv.q?user_id=ana",
            "conversation_id",
        ),
        (
            "/api/maestra/conversations/..%2F..%2Fetc?user_id=ana",
            "conversation_id",
        ),
    ];
    for (path, mentions) in cases {
        let response = app.get(path).await;
        assert_error(response, 400, "invalid_request", mentions, path).await;
    }
}
