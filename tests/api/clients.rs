//! `maestra ask` and `maestra health`, the real binary against real servers on random ports:
//! conversation continuity, local → cloud fallback (and when not to fall back), streaming,
//! and one clear line on stderr for every failure.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{TEST_API_KEY, maestra_command, spawn_app, spawn_app_with, spawn_cloud_app};

/// `maestra <args>` as a client, with only the given variables set; its output once it ends.
pub async fn maestra(data_dir: &Path, vars: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = maestra_command(data_dir, vars);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Async, so that servers running in this test's runtime keep answering meanwhile.
    tokio::process::Command::from(command)
        .output()
        .await
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A loopback URL where nothing listens: connections are refused.
pub fn closed_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Asserts a failed command said so in exactly one line on stderr, and returns that line.
fn one_error_line(output: &Output, exit_code: i32) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(exit_code), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("maestra: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.trim_end().to_owned()
}

async fn ask_json(data_dir: &Path, vars: &[(&str, &str)], args: &[&str]) -> Value {
    let mut all = vec!["ask", "--json"];
    all.extend_from_slice(args);
    let output = maestra(data_dir, vars, &all).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn ask_continues_the_last_conversation_of_its_surface_until_told_otherwise() {
    let app = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let vars = [
        ("MAESTRA_LOCAL_URL", app.address.as_str()),
        ("MAESTRA_USER_ID", "ana"),
    ];

    let first = ask_json(home.path(), &vars, &["Hello"]).await;
    assert_eq!(first["backend"], "local");
    assert_eq!(first["surface_id"], "cli");
    let conversation = first["conversation_id"].as_str().unwrap().to_owned();
    let second = ask_json(home.path(), &vars, &["And again"]).await;
    assert_eq!(second["conversation_id"], conversation.as_str());
    assert_eq!(second["seq"], 4, "the second turn of one conversation");

    // Another surface has its own "last conversation"; --new starts one; --conversation picks.
    let other_surface = ask_json(home.path(), &vars, &["--surface", "mobile", "Hi"]).await;
    assert_ne!(other_surface["conversation_id"], conversation.as_str());
    let fresh = ask_json(home.path(), &vars, &["--new", "Start over"]).await;
    assert_ne!(fresh["conversation_id"], conversation.as_str());
    assert_eq!(fresh["seq"], 2);
    let after_new = ask_json(home.path(), &vars, &["Continue the new one"]).await;
    assert_eq!(after_new["conversation_id"], fresh["conversation_id"]);
    let picked = ask_json(
        home.path(),
        &vars,
        &["--conversation", &conversation, "Back"],
    )
    .await;
    assert_eq!(picked["conversation_id"], conversation.as_str());
    assert_eq!(picked["seq"], 6);

    // Plain output: the reply alone on stdout, who answered on stderr.
    let output = maestra(home.path(), &vars, &["ask", "Plain please"]).await;
    assert!(output.status.success());
    let stdout = text(&output.stdout);
    assert!(stdout.contains("You said: \"Plain please\""), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("answered by local") && stderr.contains(&conversation),
        "{stderr}"
    );
}

#[tokio::test]
async fn ask_with_no_backend_reachable_exits_1_with_one_clear_line() {
    let home = tempfile::tempdir().unwrap();
    let local = closed_url();
    let output = maestra(
        home.path(),
        &[("MAESTRA_LOCAL_URL", &local), ("MAESTRA_USER_ID", "ana")],
        &["ask", "Hello?"],
    )
    .await;
    let line = one_error_line(&output, 1);
    assert!(
        line.contains(&format!("cannot reach the local backend at {local}"))
            && line.contains("connection refused")
            && line.contains("maestra serve"),
        "{line}"
    );
    assert!(output.stdout.is_empty());

    // With fallback on and the cloud down too, the line names both.
    let cloud = closed_url();
    let output = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", &local),
            ("MAESTRA_CLOUD_URL", &cloud),
            ("MAESTRA_FALLBACK_ENABLED", "yes"),
            ("MAESTRA_API_KEY", "sk_never_printed_0123456789"),
            ("MAESTRA_USER_ID", "ana"),
        ],
        &["ask", "Hello?"],
    )
    .await;
    let line = one_error_line(&output, 1);
    assert!(line.contains(&local) && line.contains(&cloud), "{line}");
    assert!(!line.contains("sk_never_printed"), "{line}");
}

#[tokio::test]
async fn bad_client_settings_and_usage_errors_are_named() {
    let home = tempfile::tempdir().unwrap();
    let output = maestra(
        home.path(),
        &[
            ("MAESTRA_FALLBACK_ENABLED", "maybe"),
            ("MAESTRA_USER_ID", "ana"),
        ],
        &["ask", "Hello"],
    )
    .await;
    let line = one_error_line(&output, 1);
    assert!(
        line.starts_with("maestra: MAESTRA_FALLBACK_ENABLED:"),
        "{line}"
    );

    let output = maestra(
        home.path(),
        &[("MAESTRA_LOCAL_URL", "localhost:8825")],
        &["health"],
    )
    .await;
    let line = one_error_line(&output, 1);
    assert!(line.starts_with("maestra: MAESTRA_LOCAL_URL:"), "{line}");

    for args in [
        &["ask"][..],
        &["ask", "--new", "--conversation", "conv_1", "Hi"],
        &["health", "--bogus"],
        &["mcp", "extra"],
    ] {
        let output = maestra(home.path(), &[], args).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&output.stderr)
        );
    }
    for command in ["ask", "health", "mcp"] {
        let output = maestra(home.path(), &[], &[command, "--help"]).await;
        assert!(output.status.success(), "{command} --help");
        assert!(text(&output.stdout).contains("Usage: maestra"), "{command}");
    }
}

/// A 4xx from local is the answer: the cloud, which would take this message, is not asked.
#[sqlx::test(migrations = false)]
async fn a_4xx_from_local_is_the_answer_and_the_cloud_is_never_asked(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let local = spawn_app_with(&[("MAESTRA_MAX_MESSAGE_BYTES", "100")]).await;
    let cloud = spawn_cloud_app(&db, &[]).await;
    let home = tempfile::tempdir().unwrap();
    let too_big = "a".repeat(200);
    let output = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", &local.address),
            ("MAESTRA_CLOUD_URL", &cloud.app.address),
            ("MAESTRA_FALLBACK_ENABLED", "true"),
            ("MAESTRA_API_KEY", TEST_API_KEY),
            ("MAESTRA_USER_ID", "ana"),
        ],
        &["ask", &too_big],
    )
    .await;
    let line = one_error_line(&output, 1);
    assert!(
        line.contains("local backend answered 413 payload_too_large"),
        "{line}"
    );
    let cloud_messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&cloud.pool)
        .await
        .unwrap();
    assert_eq!(cloud_messages, 0, "the cloud was asked");

    // The same message is one the cloud takes: it was the 4xx that kept it local.
    let reply = cloud
        .core(
            TEST_API_KEY,
            &json!({"user_id": "ana", "surface_id": "cli", "message": too_big}),
        )
        .await;
    assert_eq!(reply.status(), 200);
}

#[sqlx::test(migrations = false)]
async fn a_5xx_from_local_falls_back_to_the_cloud_which_says_it_answered(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let local = spawn_app().await;
    // Without its conversations folder, local storage is unavailable: 503.
    std::fs::remove_dir_all(local.conversations_dir()).unwrap();
    let cloud = spawn_cloud_app(&db, &[]).await;
    let home = tempfile::tempdir().unwrap();
    let mut vars = vec![
        ("MAESTRA_LOCAL_URL", local.address.as_str()),
        ("MAESTRA_CLOUD_URL", cloud.app.address.as_str()),
        ("MAESTRA_API_KEY", TEST_API_KEY),
        ("MAESTRA_USER_ID", "ana"),
    ];

    // Fallback off: local's 503 is the answer.
    let output = maestra(home.path(), &vars, &["ask", "Hello"]).await;
    let line = one_error_line(&output, 1);
    assert!(line.contains("local backend answered 503"), "{line}");

    vars.push(("MAESTRA_FALLBACK_ENABLED", "1"));
    let reply = ask_json(home.path(), &vars, &["Hello"]).await;
    assert_eq!(reply["backend"], "cloud");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&cloud.pool)
        .await
        .unwrap();
    assert_eq!(stored, 2, "the cloud stored the message and its reply");
    let output = maestra(home.path(), &vars, &["ask", "Hello"]).await;
    assert!(text(&output.stderr).contains("answered by cloud"));

    // Without a key, the cloud's 401 is the answer, and the client says what is missing.
    vars.retain(|(name, _)| *name != "MAESTRA_API_KEY");
    let output = maestra(home.path(), &vars, &["ask", "Hello"]).await;
    let line = one_error_line(&output, 1);
    assert!(
        line.contains("cloud backend answered 401") && line.ends_with("MAESTRA_API_KEY is not set"),
        "{line}"
    );
}

/// A stand-in backend on a random port: answers every request with one canned response and
/// records the requests' headers, to see what the client sends.
pub struct Recorder {
    pub url: String,
    seen: Arc<Mutex<Vec<actix_web::http::header::HeaderMap>>>,
    server: actix_web::dev::ServerHandle,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        drop(self.server.stop(false));
    }
}

impl Recorder {
    pub fn start(status: u16, content_type: &'static str, body: String) -> Recorder {
        Self::start_after(Duration::ZERO, status, content_type, body)
    }

    /// One that takes `delay` to answer, like a model thinking.
    pub fn start_after(
        delay: Duration,
        status: u16,
        content_type: &'static str,
        body: String,
    ) -> Recorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let server = HttpServer::new(move || {
            let (record, body) = (Arc::clone(&record), body.clone());
            App::new().default_service(web::to(move |req: HttpRequest| {
                record.lock().unwrap().push(req.headers().clone());
                let body = body.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    HttpResponse::build(StatusCode::from_u16(status).unwrap())
                        .content_type(content_type)
                        .body(body)
                }
            }))
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .unwrap();
        let url = format!("http://{}", server.addrs()[0]);
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Recorder {
            url,
            seen,
            server: handle,
        }
    }

    fn header(&self, request: usize, name: &str) -> Option<String> {
        self.seen.lock().unwrap()[request]
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

pub fn core_reply(text: &str) -> Value {
    json!({
        "reply": text, "conversation_id": "conv_streamed", "message_id": "msg_1", "seq": 2,
        "surface_id": "cli", "model": "fake", "created_at": "2026-11-25T09:00:00Z",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "cost_usd": 0.0},
        "backend": "cloud",
    })
}

#[tokio::test]
async fn the_fallback_attempt_carries_the_same_idempotency_key_and_only_the_cloud_gets_the_key() {
    let envelope =
        json!({"error": {"code": "storage_unavailable", "message": "down", "request_id": "r"}});
    let local = Recorder::start(503, "application/json", envelope.to_string());
    let cloud = Recorder::start(
        200,
        "application/json",
        core_reply("from the cloud").to_string(),
    );
    let home = tempfile::tempdir().unwrap();
    let output = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", &local.url),
            ("MAESTRA_CLOUD_URL", &cloud.url),
            ("MAESTRA_FALLBACK_ENABLED", "true"),
            ("MAESTRA_API_KEY", TEST_API_KEY),
            ("MAESTRA_USER_ID", "ana"),
        ],
        &["ask", "Hello"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "from the cloud\n");

    let key = local.header(0, "idempotency-key").unwrap();
    assert!(uuid::Uuid::parse_str(&key).is_ok(), "{key}");
    assert_eq!(
        cloud.header(0, "idempotency-key").as_deref(),
        Some(key.as_str())
    );
    assert_eq!(cloud.header(0, "x-api-key").as_deref(), Some(TEST_API_KEY));
    assert_eq!(local.header(0, "x-api-key"), None, "the key went to local");

    // Each ask has its own key.
    maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", &cloud.url),
            ("MAESTRA_USER_ID", "ana"),
        ],
        &["ask", "Hello"],
    )
    .await;
    assert_ne!(
        cloud.header(1, "idempotency-key").as_deref(),
        Some(key.as_str())
    );
}

#[tokio::test]
async fn ask_stream_prints_the_pieces_of_a_streamed_reply() {
    // The event format of the streaming branch: delta pieces, then done with the response.
    let events = format!(
        "event: delta\ndata: {}\n\nevent: delta\ndata: {}\n\n: keep-alive\n\nevent: done\ndata: {}\n\n",
        json!({"text": "Hel"}),
        json!({"text": "lo!"}),
        core_reply("Hello!")
    );
    let server = Recorder::start(200, "text/event-stream", events);
    let home = tempfile::tempdir().unwrap();
    let vars = [
        ("MAESTRA_LOCAL_URL", server.url.as_str()),
        ("MAESTRA_USER_ID", "ana"),
    ];

    let output = maestra(home.path(), &vars, &["ask", "--stream", "Hi"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "Hello!\n");
    assert!(
        server
            .header(0, "accept")
            .unwrap()
            .contains("text/event-stream")
    );
    let streamed = ask_json(home.path(), &vars, &["--stream", "Hi"]).await;
    assert_eq!(streamed["reply"], "Hello!");
    assert_eq!(streamed["backend"], "local");

    // A failure midway is one line on stderr, exit 1.
    let failing = Recorder::start(
        200,
        "text/event-stream",
        format!(
            "event: delta\ndata: {}\n\nevent: error\ndata: {}\n\n",
            json!({"text": "Par"}),
            json!({"error": {"code": "provider_error", "message": "the model failed", "request_id": "r"}})
        ),
    );
    let output = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", &failing.url),
            ("MAESTRA_USER_ID", "ana"),
        ],
        &["ask", "--stream", "Hi"],
    )
    .await;
    let line = one_error_line(&output, 1);
    assert!(
        line.contains("provider_error") && line.contains("the model failed"),
        "{line}"
    );
}

#[tokio::test]
async fn health_shows_both_backends_and_fails_only_when_neither_is_up() {
    let local = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let cloud = closed_url();
    let output = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", &local.address),
            ("MAESTRA_CLOUD_URL", &cloud),
        ],
        &["health"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let table = text(&output.stdout);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row: {table}"))
            .to_owned()
    };
    let local_row = row("local");
    assert!(
        local_row.contains(&local.address)
            && local_row.contains("healthy")
            && local_row.contains("2.0.0")
            && local_row.contains(" ms"),
        "{local_row}"
    );
    let cloud_row = row("cloud");
    assert!(
        cloud_row.contains(&cloud) && cloud_row.contains("unreachable"),
        "{cloud_row}"
    );

    let output = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", &local.address),
            ("MAESTRA_CLOUD_URL", &cloud),
        ],
        &["health", "--json"],
    )
    .await;
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["local"]["healthy"], true);
    assert_eq!(report["local"]["mode"], "local");
    assert_eq!(report["cloud"]["status"], "unreachable");

    drop(local);
    let output = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", &closed_url()),
            ("MAESTRA_CLOUD_URL", &cloud),
        ],
        &["health"],
    )
    .await;
    assert_eq!(one_error_line(&output, 1), "maestra: no backend is healthy");
    assert!(text(&output.stdout).contains("unreachable"));
}
