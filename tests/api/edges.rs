//! What real clients send at the edges: bodies that are not objects, repeated keys, messages
//! escaped the way Python's `requests` escapes them, and what the service answers.

use serde_json::Value;

use crate::helpers::{TestApp, spawn_app};

async fn post_raw(app: &TestApp, path: &str, body: String) -> reqwest::Response {
    app.client
        .post(format!("{}{path}", app.address))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn error_of(response: reqwest::Response, status: u16, case: &str) -> String {
    assert_eq!(response.status(), status, "{case}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["code"],
        if status == 413 {
            "payload_too_large"
        } else {
            "invalid_request"
        },
        "{case}: {body}"
    );
    body["error"]["message"].as_str().unwrap().to_owned()
}

/// Every character written as JSON's longest escape: `\u00XX` for each byte of ASCII.
fn escaped_at_worst(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        assert!(c.is_ascii(), "only ASCII can be escaped byte by byte");
        out.push_str(&format!("\\u{:04x}", c as u32));
    }
    out.push('"');
    out
}

/// Python's `json.dumps` (what `requests.post(json=…)` sends): non-ASCII as `\uXXXX`,
/// characters beyond the BMP as a surrogate pair.
fn escaped_like_python(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out.push('"');
    out
}

#[tokio::test]
async fn only_a_json_object_is_a_request_and_the_error_says_so_in_plain_words() {
    let app = spawn_app().await;
    for path in ["/api/maestra/core", "/api/maestra/advisor/ask"] {
        for body in [
            r#"["u","cli","conv_arr","hi"]"#,
            r#""just a string""#,
            "42",
            "null",
        ] {
            let case = format!("{path} {body}");
            let message = error_of(post_raw(&app, path, body.to_owned()).await, 400, &case).await;
            assert!(message.contains("a JSON object"), "{case}: {message}");
            assert!(
                !message.contains("struct") && !message.contains("Request"),
                "{case}: a Rust type name in {message:?}"
            );
        }
    }
    assert!(
        std::fs::read_dir(app.conversations_dir())
            .unwrap()
            .next()
            .is_none(),
        "an array body stored a conversation"
    );
    assert!(app.ledger().is_empty(), "a refused body reached the ledger");
}

#[tokio::test]
async fn a_repeated_key_is_refused_in_a_body_as_in_a_query_string() {
    let app = spawn_app().await;
    let body = r#"{"user_id":"ana","surface_id":"cli","message":"hi","message":"other"}"#;
    let message = error_of(
        post_raw(&app, "/api/maestra/core", body.to_owned()).await,
        400,
        "repeated key in the body",
    )
    .await;
    assert!(
        message.contains("\"message\" appears more than once"),
        "{message}"
    );
    let nested = r#"{"question":"q","user_id":"ana","extra":{"a":1,"a":2}}"#;
    let message = error_of(
        post_raw(&app, "/api/maestra/advisor/ask", nested.to_owned()).await,
        400,
        "repeated key in a nested object",
    )
    .await;
    assert!(
        message.contains("\"a\" appears more than once"),
        "{message}"
    );

    let response = app
        .get("/api/maestra/conversations?user_id=ana&user_id=bob")
        .await;
    let message = error_of(response, 400, "repeated query parameter").await;
    assert!(message.contains("duplicate field `user_id`"), "{message}");
    assert!(app.ledger().is_empty());
}

#[tokio::test]
async fn a_message_within_the_limit_is_accepted_however_the_client_escapes_it() {
    let app = spawn_app().await;
    // 6,900 emoji: 27,600 bytes of text, 82,800 once Python escapes them.
    let emoji = "😀".repeat(6900);
    let body = format!(
        r#"{{"user_id":"ana","surface_id":"python","conversation_id":"conv_emoji","message":{}}}"#,
        escaped_like_python(&emoji)
    );
    assert!(body.len() > 82_000);
    let response = post_raw(&app, "/api/maestra/core", body).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let stored = app.messages("ana", "conv_emoji").await;
    assert_eq!(stored[0]["content"], emoji.as_str());

    // The worst case: every byte of a full-size message, and of every id, as \u00XX.
    let full = "m".repeat(32 * 1024);
    let id = |c: &str| escaped_at_worst(&c.repeat(128));
    let body = format!(
        r#"{{ "user_id" : {}, "surface_id" : {}, "conversation_id" : {}, "message" : {}, "stream" : false }}"#,
        id("u"),
        id("s"),
        id("c"),
        escaped_at_worst(&full)
    );
    let response = post_raw(&app, "/api/maestra/core", body).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    // The advisor takes two texts: both full-size, both escaped at worst.
    let body = format!(
        r#"{{"question":{},"context":{},"user_id":{}}}"#,
        escaped_at_worst(&full),
        escaped_at_worst(&full),
        id("u")
    );
    let response = post_raw(&app, "/api/maestra/advisor/ask", body).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    // One byte over is the message's 413, not the body's.
    let body = format!(
        r#"{{"user_id":"ana","surface_id":"cli","message":{}}}"#,
        escaped_at_worst(&format!("{full}m"))
    );
    let message = error_of(post_raw(&app, "/api/maestra/core", body).await, 413, "over").await;
    assert!(message.starts_with("message: larger than"), "{message}");
}

#[tokio::test]
async fn the_body_cap_follows_the_configured_message_limit() {
    let app = crate::helpers::spawn_app_with(&[("MAESTRA_MAX_MESSAGE_BYTES", "100000")]).await;
    // A 600 KB body: far over the old fixed cap, within 6 × the configured limit.
    let text = format!(
        r#"{{"user_id":"ana","surface_id":"cli","message":{}}}"#,
        escaped_at_worst(&"x".repeat(100_000))
    );
    assert!(text.len() > 600_000);
    let response = post_raw(&app, "/api/maestra/core", text).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/maestra/core", app.address),
        )
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_refused_cors_origin_is_a_403_forbidden() {
    let app = spawn_app().await;
    let refused = preflight(&app, "https://evil.example").await;
    let message = {
        assert_eq!(refused.status(), 403);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        body["error"]["message"].as_str().unwrap().to_owned()
    };
    assert!(message.contains("Origin is not allowed"), "{message}");
}

#[tokio::test]
async fn an_extension_allow_list_admits_those_extensions_and_no_other() {
    let ours = "abcdefghijklmnopabcdefghijklmnop";
    let firefox = "3f1c9a3e-5d2b-4a47-9d1e-2b8f0c6a7e11";
    let app = crate::helpers::spawn_app_with(&[(
        "MAESTRA_CORS_EXTENSION_IDS",
        &format!("{ours}, {firefox}"),
    )])
    .await;
    for origin in [
        format!("chrome-extension://{ours}"),
        format!("moz-extension://{firefox}"),
    ] {
        let response = preflight(&app, &origin).await;
        assert_eq!(response.status(), 200, "{origin}");
        assert_eq!(response.headers()["access-control-allow-origin"], *origin);
    }
    for origin in [
        "chrome-extension://ponmlkjihgfedcbaponmlkjihgfedcba",
        "moz-extension://00000000-0000-0000-0000-000000000000",
        "safari-web-extension://abcdefghijklmnopabcdefghijklmnopx",
    ] {
        let response = preflight(&app, origin).await;
        assert_eq!(response.status(), 403, "{origin}");
        assert!(
            response
                .headers()
                .get("access-control-allow-origin")
                .is_none()
        );
    }
    // Unset, every extension is admitted, as before.
    let app = spawn_app().await;
    let response = preflight(&app, "chrome-extension://ponmlkjihgfedcbaponmlkjihgfedcba").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_slow_request_head_gets_the_json_408_and_the_connection_closes() {
    use std::io::{Read, Write};
    let data = tempfile::tempdir().unwrap();
    let server = crate::helpers::ServerProcess::start(data.path(), &[]).await;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    stream
        .write_all(b"POST /api/maestra/core HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    let said = tokio::task::spawn_blocking(move || {
        let mut said = Vec::new();
        let _ = stream.read_to_end(&mut said);
        String::from_utf8_lossy(&said).into_owned()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_secs(4) && elapsed < std::time::Duration::from_secs(8),
        "cut off after {elapsed:?}"
    );
    let (head, body) = said.split_once("\r\n\r\n").expect("a whole response");
    assert!(head.starts_with("HTTP/1.1 408"), "{said:?}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    let request_id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("an X-Request-Id");
    assert_eq!(body["error"]["request_id"], request_id);

    // A client that sends its head in time is served as usual, even one arriving late.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    stream
        .write_all(b"Host: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let said = tokio::task::spawn_blocking(move || {
        let mut said = Vec::new();
        let _ = stream.read_to_end(&mut said);
        String::from_utf8_lossy(&said).into_owned()
    })
    .await
    .unwrap();
    assert!(said.starts_with("HTTP/1.1 200"), "{said:?}");
}

fn overhead_of(response: &reqwest::Response) -> Option<f64> {
    response
        .headers()
        .get("x-maestra-overhead-ms")
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

#[tokio::test]
async fn errors_carry_the_overhead_header_and_a_stream_gives_it_in_its_done_event() {
    use crate::fake_provider::{FakeProvider, Step};
    let provider = FakeProvider::scripted(
        vec![Step::Delay(
            std::time::Duration::from_millis(400),
            Box::new(Step::Status(500, None)),
        )],
        Step::reply("Fine."),
    )
    .await;
    let app = crate::helpers::spawn_app_with_provider(
        &provider.base_url,
        &[("MAESTRA_LLM_MAX_RETRIES", "0")],
    )
    .await;
    let hello = |conversation: &str| serde_json::json!({"user_id": "ana", "surface_id": "cli", "conversation_id": conversation, "message": "Hello"});

    // The provider fails after 400 ms: the header leaves its time out.
    let started = std::time::Instant::now();
    let failed = app.post_core(&hello("conv_a")).await;
    assert_eq!(failed.status(), 502);
    assert!(started.elapsed().as_millis() >= 400);
    let overhead = overhead_of(&failed).expect("the header on a 502");
    assert!(
        overhead < 300.0,
        "the provider's wait counted: {overhead} ms"
    );

    // Someone else's conversation: 404, with the header.
    app.say("ana", "cli", Some("conv_b"), "Hi").await;
    let mut body = hello("conv_b");
    body["user_id"] = "bob".into();
    let not_found = app.post_core(&body).await;
    assert_eq!(not_found.status(), 404);
    assert!(overhead_of(&not_found).is_some(), "no header on a 404");

    let invalid = post_raw(&app, "/api/maestra/core", "[]".to_owned()).await;
    assert_eq!(invalid.status(), 400);
    assert!(overhead_of(&invalid).is_some(), "no header on a 400");
    let advisor = post_raw(&app, "/api/maestra/advisor/ask", "{}".to_owned()).await;
    assert_eq!(advisor.status(), 400);
    assert!(
        overhead_of(&advisor).is_some(),
        "no header on the advisor's 400"
    );

    // A stream: its headers leave before the model is done; the figure is in `done`.
    let streamed = app.post_core_streaming(&hello("conv_b")).await;
    assert_eq!(streamed.status(), 200);
    assert!(overhead_of(&streamed).is_none());
    let events = crate::helpers::read_events(streamed).await;
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done");
    assert!(done["overhead_ms"].as_f64().is_some(), "{done}");
}
