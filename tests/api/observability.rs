//! Metrics, probes, traces and logs, checked the way an operator's tools read them.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{ServerProcess, TestApp, spawn_app, spawn_cloud_app};

fn scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of a counter or gauge series, or a histogram's observation count.
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

async fn metrics_text(app: &TestApp) -> String {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

#[tokio::test]
async fn metrics_count_what_was_sent() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.say("ana", "cli", Some("conv_m"), &format!("m{i}"))
            .await;
    }
    let blank = app
        .post_core(&json!({"user_id": "ana", "surface_id": "cli", "message": " "}))
        .await;
    assert_eq!(blank.status(), 400);
    assert_eq!(
        app.get("/api/maestra/conversations/conv_none?user_id=ana")
            .await
            .status(),
        404
    );

    let text = metrics_text(&app).await;
    let metrics = scrape(&text);
    let core = |status| {
        value(
            &metrics,
            "maestra_http_requests_total",
            &[
                ("route", "/api/maestra/core"),
                ("method", "POST"),
                ("status", status),
            ],
        )
    };
    assert_eq!(core("200"), 3.0);
    assert_eq!(core("400"), 1.0);
    // prometheus-parse misreads braces inside label values, so this series is read as text.
    assert!(
        text.lines().any(|l| l == r#"maestra_http_requests_total{method="GET",route="/api/maestra/conversations/{conversation_id}",status="404"} 1"#),
        "{text}"
    );
    assert_eq!(
        value(
            &metrics,
            "maestra_http_request_duration_seconds",
            &[("route", "/api/maestra/core"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(value(&metrics, "maestra_overhead_seconds", &[]), 3.0);
    assert_eq!(
        value(
            &metrics,
            "maestra_provider_duration_seconds",
            &[("model", "maestra-offline")]
        ),
        3.0
    );
    assert!(
        value(
            &metrics,
            "maestra_tokens_total",
            &[
                ("model", "maestra-offline"),
                ("kind", "prompt"),
                ("tenant", "local")
            ]
        ) > 0.0
    );
    assert!(value(&metrics, "maestra_tokens_total", &[("kind", "completion")]) > 0.0);
    assert_eq!(
        value(
            &metrics,
            "maestra_cost_usd_total",
            &[("model", "maestra-offline")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &metrics,
            "maestra_store_operation_duration_seconds",
            &[("operation", "append")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &metrics,
            "maestra_build_info",
            &[("version", "2.0.0"), ("mode", "local")]
        ),
        1.0
    );
    // This scrape is itself in flight.
    assert_eq!(value(&metrics, "maestra_http_requests_in_flight", &[]), 1.0);
}

#[tokio::test]
async fn promtool_accepts_the_metrics() {
    let app = spawn_app().await;
    app.say("ana", "cli", None, "hello").await;
    let text = metrics_text(&app).await;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(
            "promtool must be installed (Debian's prometheus package; bash .ci/run installs it)",
        );
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn liveness_and_readiness_probes() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/live").await.status(), 200);
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "ready");

    std::fs::remove_dir_all(app.conversations_dir()).unwrap();
    assert_eq!(app.get("/health/ready").await.status(), 503);
    assert_eq!(
        app.get("/health/live").await.status(),
        200,
        "alive, just not ready"
    );
}

#[tokio::test]
async fn sigterm_drains_first_readiness_says_503_then_the_server_stops() {
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path(), &[("MAESTRA_DRAIN_SECONDS", "2")]).await;
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(server.url("/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let draining = client
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(draining.status(), 503);
    assert_eq!(
        draining.json::<Value>().await.unwrap()["status"],
        "draining"
    );
    // Still serving meanwhile: in-flight and late requests are answered.
    assert_eq!(
        client
            .get(server.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop after draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn cloud_metrics_need_the_metrics_token(_: PgPoolOptions, db: PgConnectOptions) {
    let off = spawn_cloud_app(&db, &[]).await;
    let response = off
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAESTRA_METRICS_TOKEN")
    );
    drop(off);

    let app = spawn_cloud_app(&db, &[("MAESTRA_METRICS_TOKEN", "scrape-token-123")]).await;
    let unauthorized = app
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let wrong = app
        .request(Method::GET, "/metrics", None)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    // One key used many times: argon2 runs once for it.
    for i in 0..20 {
        let response = app
            .core(
                &app.api_key,
                &json!({"user_id": "ana", "surface_id": "mobile", "message": format!("m{i}")}),
            )
            .await;
        assert_eq!(response.status(), 200);
    }
    let bad = app
        .request(
            Method::GET,
            "/api/maestra/conversations?user_id=ana",
            Some("sk_wrong_key_000000"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);

    let text = app.metrics("scrape-token-123").await;
    let metrics = scrape(&text);
    assert_eq!(
        value(&metrics, "maestra_auth_argon2_verifications_total", &[]),
        2.0,
        "one for the key, one for the wrong key"
    );
    assert_eq!(value(&metrics, "maestra_auth_failures_total", &[]), 1.0);
    assert!(
        value(
            &metrics,
            "maestra_tokens_total",
            &[("tenant", "default"), ("kind", "prompt")]
        ) > 0.0
    );
    assert_eq!(
        value(&metrics, "maestra_build_info", &[("mode", "cloud")]),
        1.0
    );
}

/// An OTLP/HTTP receiver: keeps every span it is sent.
async fn otlp_receiver() -> (
    u16,
    Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
) {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let spans = Arc::new(Mutex::new(Vec::new()));
    let collected = spans.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(move || {
        let collected = collected.clone();
        App::new().route(
            "/v1/traces",
            web::post().to(move |body: web::Bytes| {
                let collected = collected.clone();
                async move {
                    let request = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body)
                        .expect("OTLP protobuf");
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            collected.lock().unwrap().extend(scope.spans);
                        }
                    }
                    HttpResponse::Ok().content_type("application/x-protobuf").body(Vec::new())
                }
            }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    (port, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_traceparent_continues_into_exported_spans() {
    let (port, spans) = otlp_receiver().await;
    let data = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut server =
        ServerProcess::start(data.path(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(server.url("/api/maestra/core"))
        .header("traceparent", format!("00-{trace_id}-{parent_span}-01"))
        .json(&json!({"user_id": "ana", "surface_id": "cli", "message": "trace me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Stopping flushes the batch of spans.
    server.signal("TERM");
    let status = server.child.wait().unwrap();
    assert!(status.success());

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let spans = spans.lock().unwrap().clone();
        let in_trace: Vec<_> = spans
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .collect();
        let names: Vec<&str> = in_trace.iter().map(|s| s.name.as_str()).collect();
        if [
            "http.request",
            "conversation.turn",
            "store",
            "provider.reply",
        ]
        .iter()
        .all(|n| names.contains(n))
        {
            let root = in_trace.iter().find(|s| s.name == "http.request").unwrap();
            assert_eq!(
                hex(&root.parent_span_id),
                parent_span,
                "the caller's span is the parent"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans in the trace: {names:?} (of {} spans)",
            spans.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn logs_never_hold_keys_or_message_text(_: PgPoolOptions, db: PgConnectOptions) {
    let url = crate::helpers::database_url(&db);
    let data = tempfile::tempdir().unwrap();
    let stdout_path = data.path().join("stdout.log");
    let stderr_path = data.path().join("stderr.log");
    let key = "sk_log_test_key_4242424242";
    let marker = "SECRET-MESSAGE-7f3a";
    {
        let mut command = crate::helpers::maestra_command(
            data.path(),
            &[
                ("MAESTRA_MODE", "cloud"),
                ("MAESTRA_HOST", "127.0.0.1"),
                ("DATABASE_URL", &url),
                ("MAESTRA_API_KEY", key),
                ("RUST_LOG", "debug"),
            ],
        );
        command
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .arg("serve");
        let mut child = command.spawn().unwrap();
        let port = wait_for_port(&stdout_path, &mut child).await;
        let client = reqwest::Client::new();
        let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
        let body = json!({"user_id": "ana", "surface_id": "cli", "message": marker});
        for wrong in ["sk_wrong_key_123456789", &format!("{key}x")] {
            client
                .post(url("/api/maestra/core"))
                .header("X-API-Key", wrong)
                .json(&body)
                .send()
                .await
                .unwrap();
        }
        let ok = client
            .post(url("/api/maestra/core"))
            .header("X-API-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        client
            .post(url("/api/maestra/core"))
            .bearer_auth(key)
            .header("Content-Type", "application/json")
            .body(format!("{{\"message\": \"{marker}\", \"user_id\": 5"))
            .send()
            .await
            .unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap();
    }
    let mut logs = String::new();
    for path in [&stdout_path, &stderr_path] {
        std::fs::File::open(path)
            .unwrap()
            .read_to_string(&mut logs)
            .unwrap();
    }
    assert!(logs.contains("request handled"), "the logs were captured");
    for secret in [key, marker, "sk_wrong_key_123456789"] {
        assert!(!logs.contains(secret), "the logs contain {secret:?}");
    }
}

/// Reads the port from the server's "maestra is serving" log line.
async fn wait_for_port(stdout: &std::path::Path, child: &mut std::process::Child) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(stdout).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("maestra is serving")) {
            let entry: Value = serde_json::from_str(line).unwrap();
            let address = entry["address"].as_str().unwrap();
            return address.rsplit(':').next().unwrap().parse().unwrap();
        }
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_unreachable_collector_is_one_warning_not_one_per_batch() {
    let data = tempfile::tempdir().unwrap();
    let stdout_path = data.path().join("stdout.log");
    let stderr_path = data.path().join("stderr.log");
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{closed}");
    let mut command = crate::helpers::maestra_command(
        data.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Export every 100 ms, so that the test sees many batches fail.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    command
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .arg("serve");
    let mut child = command.spawn().unwrap();
    let port = wait_for_port(&stdout_path, &mut child).await;
    let client = reqwest::Client::new();
    for _ in 0..8 {
        let response = client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("OpenTelemetry collector"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    let warning: Value = serde_json::from_str(warnings[0]).unwrap();
    assert_eq!(warning["level"], "WARN", "{warning}");
}
