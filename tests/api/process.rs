//! The real binary, as a user runs it: port choice, one server per folder, start-up errors,
//! graceful stop, operator commands. (Crash safety is in reliability.rs.)

use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_provider::{COMPLETION_TOKENS, FakeProvider, PROMPT_TOKENS, Step};
use crate::helpers::{ServerProcess, all_messages, maestra_command, priced_provider_vars};

/// `count` consecutive ports that are free right now.
fn free_port_run(count: u16) -> u16 {
    for _ in 0..200 {
        let base = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if base > u16::MAX - count {
            continue;
        }
        if (base..base + count).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no run of {count} free ports");
}

#[tokio::test]
async fn with_the_first_port_taken_it_serves_on_the_next_and_writes_the_port_file() {
    let base = free_port_run(5);
    let _taken = TcpListener::bind(("127.0.0.1", base)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let range = format!("{base}-{}", base + 4);
    let server = ServerProcess::start(
        data.path(),
        &[("MAESTRA_PORT", ""), ("MAESTRA_PORT_RANGE", &range)],
    )
    .await;
    assert_eq!(server.port, base + 1);
    let written = std::fs::read_to_string(data.path().join("maestra.port")).unwrap();
    assert_eq!(written.trim(), (base + 1).to_string());
}

#[tokio::test]
async fn with_every_port_taken_it_exits_1_with_one_clear_line() {
    let base = free_port_run(5);
    let _taken: Vec<_> = (base..base + 5)
        .map(|p| TcpListener::bind(("127.0.0.1", p)).unwrap())
        .collect();
    let data = tempfile::tempdir().unwrap();
    let range = format!("{base}-{}", base + 4);
    let output = maestra_command(
        data.path(),
        &[("MAESTRA_PORT", ""), ("MAESTRA_PORT_RANGE", &range)],
    )
    .stderr(std::process::Stdio::piped())
    .arg("serve")
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("maestra: every port from"), "{stderr}");
    assert!(last.contains("in use"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn a_second_server_on_the_same_data_folder_exits_with_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(data.path(), &[]).await;
    let output = maestra_command(data.path(), &[])
        .stderr(std::process::Stdio::piped())
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("another maestra server is already using"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&first.port.to_string()),
        "names the running server's port: {stderr}"
    );
    // The first one is unharmed.
    let health = reqwest::get(first.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn bad_configuration_stops_start_up_naming_the_variable() {
    let data = tempfile::tempdir().unwrap();
    for (variable, value) in [
        ("MAESTRA_MODE", "hybrid"),
        ("MAESTRA_PORT", "99999"),
        ("MAESTRA_HOST", "nowhere"),
    ] {
        let output = maestra_command(data.path(), &[(variable, value)])
            .stderr(std::process::Stdio::piped())
            .arg("serve")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{variable}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("maestra: {variable}: ")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let data = tempfile::tempdir().unwrap();
    let status = maestra_command(data.path(), &[])
        .arg("no-such-command")
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let status = maestra_command(data.path(), &[])
        .arg("--help")
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly_and_restarting_keeps_everything() {
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path(), &[]).await;
    let client = reqwest::Client::new();
    for i in 0..3 {
        let response = client
            .post(server.url("/api/maestra/core"))
            .json(&json!({"user_id": "ana", "surface_id": "cli", "conversation_id": "conv_keep", "message": format!("m{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    server.signal("TERM");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !data.path().join("maestra.port").exists(),
        "the port file is removed on a clean stop"
    );

    let server = ServerProcess::start(data.path(), &[]).await;
    let messages = crate::helpers::all_messages(&server.url(""), None, "conv_keep").await;
    assert_eq!(messages.len(), 6);
}

/// Waits for the server to exit without blocking this test's runtime (the fake provider runs
/// on it), at most `limit`.
async fn exit_of(server: &mut ServerProcess, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_waits_for_a_turn_whose_client_has_gone_and_its_reply_is_stored_and_priced() {
    // Six pieces 400 ms apart: the model is still writing for ~2 s after the client leaves.
    let reply = "the model is still writing when the server is told to stop";
    let provider = FakeProvider::start(Step::SlowStream(
        reply.to_owned(),
        Duration::from_millis(400),
    ))
    .await;
    let mut vars = priced_provider_vars(&provider);
    vars.push(("MAESTRA_LLM_REQUEST_TIMEOUT", "20"));
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path(), &vars).await;

    let client = reqwest::Client::new();
    let mut response = client
        .post(server.url("/api/maestra/core"))
        .json(&json!({"user_id": "ana", "surface_id": "cli", "conversation_id": "conv_detached", "message": "Hello", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"event: delta"), "{first:?}");
    drop(response); // the client goes away mid-stream...
    drop(client);
    server.signal("TERM"); // ...and the server is told to stop at once

    let stopping = Instant::now();
    let status = exit_of(&mut server, Duration::from_secs(35)).await;
    assert!(status.success(), "{status}");
    assert!(
        stopping.elapsed() >= Duration::from_millis(1000),
        "the server waited for the model to finish ({:?})",
        stopping.elapsed()
    );

    let server = ServerProcess::start(data.path(), &vars).await;
    let messages = all_messages(&server.url(""), None, "conv_detached").await;
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], reply);
    let cost = messages[1]["usage"]["cost_usd"].as_f64().unwrap();
    assert!(cost > 0.0, "the stored reply is priced: {messages:#?}");

    // Priced in the ledger as any reply is, so `maestra usage` counts it.
    let ledger = std::fs::read_to_string(data.path().join("maestra_metrics.jsonl")).unwrap();
    let lines: Vec<Value> = ledger
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{ledger}");
    assert_eq!(lines[0]["conversation_id"], "conv_detached");
    assert_eq!(lines[0]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(lines[0]["completion_tokens"], COMPLETION_TOKENS);
    assert_eq!(lines[0]["cost_usd"].as_f64().unwrap(), cost);
    let usage = maestra_command(data.path(), &[])
        .stdout(std::process::Stdio::piped())
        .args(["usage", "--json"])
        .output()
        .unwrap();
    assert!(usage.status.success());
    let usage: Value = serde_json::from_slice(&usage.stdout).unwrap();
    assert_eq!(usage["total"]["requests"], 1, "{usage}");
}

/// `maestra` with DATABASE_URL, capturing its output.
fn maestra_db(url: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    maestra_command(dir.path(), &[("DATABASE_URL", url)])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[sqlx::test(migrations = false)]
async fn operators_manage_keys_from_the_command_line(
    _: sqlx::postgres::PgPoolOptions,
    db: sqlx::postgres::PgConnectOptions,
) {
    let url = crate::helpers::database_url(&db);
    let created = maestra_db(
        &url,
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--label",
            "mobile",
            "--rate-limit",
            "10/60",
            "--expires-in",
            "30d",
        ],
    );
    assert!(created.status.success(), "{}", text(&created.stderr));
    let key = text(&created.stdout).trim().to_owned();
    assert!(key.starts_with("mk_"), "the key alone on stdout: {key:?}");
    let id = key[3..15].to_owned();
    assert!(text(&created.stderr).contains(&id));

    let listed = maestra_db(&url, &["keys", "list", "--tenant", "acme"]);
    assert!(listed.status.success());
    let listing = text(&listed.stdout);
    for expected in [id.as_str(), "acme", "mobile", "10/60s", "active", "never"] {
        assert!(
            listing.contains(expected),
            "{expected} missing from:\n{listing}"
        );
    }
    assert!(!listing.contains(&key[16..]), "list never shows secrets");

    let server = crate::helpers::spawn_cloud_app_at(&url, &url, &[]).await;
    let works = server
        .request(
            reqwest::Method::GET,
            "/api/maestra/conversations?user_id=ana",
            Some(&key),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(works.status(), 200);
    assert_eq!(works.headers()["x-ratelimit-limit"], "10");

    let rotated = maestra_db(&url, &["keys", "rotate", &id, "--grace", "1h"]);
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    let new_key = text(&rotated.stdout).trim().to_owned();
    assert!(new_key.starts_with("mk_") && new_key != key);
    let listing = text(&maestra_db(&url, &["keys", "list"]).stdout);
    assert!(listing.contains("rotating (valid until"), "{listing}");

    let revoked = maestra_db(&url, &["keys", "revoke", &new_key[3..15]]);
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let listing = text(&maestra_db(&url, &["keys", "list"]).stdout);
    assert!(listing.contains("revoked"), "{listing}");
}

#[sqlx::test(migrations = false)]
async fn key_commands_reject_bad_input_clearly(
    _: sqlx::postgres::PgPoolOptions,
    db: sqlx::postgres::PgConnectOptions,
) {
    let url = crate::helpers::database_url(&db);
    let usage = [
        vec!["keys", "create"],
        vec!["keys", "create", "--tenant", "acme", "--rate-limit", "0/60"],
        vec!["keys", "create", "--tenant", "acme", "--expires-in", "soon"],
        vec!["keys", "rotate", "abc", "--grace", "forever"],
    ];
    for args in usage {
        assert_eq!(maestra_db(&url, &args).status.code(), Some(2), "{args:?}");
    }
    let failures = [
        (vec!["keys", "create", "--tenant", "a b"], "tenant"),
        (vec!["keys", "revoke", "nonsense"], "not a key id"),
        (vec!["keys", "revoke", "0123456789ab"], "no key with id"),
        (vec!["keys", "rotate", "0123456789ab"], "no key with id"),
    ];
    for (args, says) in failures {
        let output = maestra_db(&url, &args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = text(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[sqlx::test(migrations = false)]
async fn migrate_prepares_a_fresh_database(
    _: sqlx::postgres::PgPoolOptions,
    db: sqlx::postgres::PgConnectOptions,
) {
    let url = crate::helpers::database_url(&db);
    let output = maestra_db(&url, &["migrate"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("up to date"));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('tenants', 'api_keys', 'conversations', 'messages', 'usage')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 5);
    assert!(
        maestra_db(&url, &["migrate"]).status.success(),
        "running it again is harmless"
    );
}

#[tokio::test]
async fn cloud_mode_without_a_reachable_database_exits_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (vec![("MAESTRA_MODE", "cloud")], "DATABASE_URL: required"),
        (
            vec![
                ("MAESTRA_MODE", "cloud"),
                (
                    "DATABASE_URL",
                    "postgres://maestra:hunter2@127.0.0.1:1/maestra",
                ),
            ],
            "DATABASE_URL: cannot reach the database",
        ),
    ];
    for (vars, says) in cases {
        let output = maestra_command(dir.path(), &vars)
            .arg("serve")
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = text(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(&format!("maestra: {says}")), "{stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "the password stays out of errors: {stderr}"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn cloud_usage_is_reported_per_tenant_and_key(
    _: sqlx::postgres::PgPoolOptions,
    db: sqlx::postgres::PgConnectOptions,
) {
    let url = crate::helpers::database_url(&db);
    let app = crate::helpers::spawn_cloud_app_at(&url, &url, &[]).await;
    let (acme_id, acme) = app.create_key("acme", None).await;
    for (key, n) in [(acme.as_str(), 2), (app.api_key.as_str(), 1)] {
        for i in 0..n {
            let body = json!({"user_id": "ana", "surface_id": "cli", "message": format!("m{i}")});
            assert_eq!(app.core(key, &body).await.status(), 200);
        }
    }
    let cloud = {
        let dir = tempfile::tempdir().unwrap();
        maestra_command(
            dir.path(),
            &[("DATABASE_URL", url.as_str()), ("MAESTRA_MODE", "cloud")],
        )
        .args(["usage", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
    };
    assert!(cloud.status.success(), "{}", text(&cloud.stderr));
    let report: serde_json::Value = serde_json::from_slice(&cloud.stdout).unwrap();
    let rows = &report["rows"];
    assert_eq!(report["total"]["requests"], 3, "{report}");
    let requests = |tenant: &str| -> i64 {
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["tenant"] == tenant)
            .map(|r| r["requests"].as_i64().unwrap())
            .sum()
    };
    assert_eq!(requests("acme"), 2);
    assert_eq!(requests("default"), 1);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["key"] == acme_id.as_str())
    );
}

#[sqlx::test(migrations = false)]
async fn keys_list_shows_when_a_key_expires_and_none_is_born_expired(
    _: sqlx::postgres::PgPoolOptions,
    db: sqlx::postgres::PgConnectOptions,
) {
    let url = crate::helpers::database_url(&db);
    let born_expired = maestra_db(
        &url,
        &["keys", "create", "--tenant", "acme", "--expires-in", "0s"],
    );
    assert_eq!(born_expired.status.code(), Some(2), "a usage error");
    assert!(text(&born_expired.stderr).contains("longer than 0"));

    let created = maestra_db(
        &url,
        &["keys", "create", "--tenant", "acme", "--expires-in", "30d"],
    );
    assert!(created.status.success(), "{}", text(&created.stderr));
    let forever = maestra_db(&url, &["keys", "create", "--tenant", "acme"]);
    assert!(forever.status.success());
    let listing = text(&maestra_db(&url, &["keys", "list"]).stdout);
    let header = listing.lines().next().unwrap();
    assert!(header.contains("EXPIRES"), "{listing}");
    let expiry = (chrono::Utc::now() + chrono::Duration::days(30))
        .format("%Y-%m-%d")
        .to_string();
    let id = |output: &std::process::Output| text(&output.stdout)[3..15].to_owned();
    let row = |id: &str| {
        listing
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap()
            .to_owned()
    };
    assert!(row(&id(&created)).contains(&expiry), "{listing}");
    let never = row(&id(&forever));
    assert_eq!(
        never.matches("never").count(),
        2,
        "last used, expires: {never}"
    );
}

#[sqlx::test(migrations = false)]
async fn local_and_cloud_usage_print_one_format_with_a_total_row(
    _: sqlx::postgres::PgPoolOptions,
    db: sqlx::postgres::PgConnectOptions,
) {
    use crate::fake_provider::{FakeProvider, Step};
    let provider = FakeProvider::start(Step::reply("Priced.")).await;
    let llm = [
        ("MAESTRA_LLM_BASE_URL", provider.base_url.as_str()),
        ("MAESTRA_LLM_MODEL", crate::helpers::TEST_MODEL),
        ("MAESTRA_LLM_PRICE_INPUT", crate::helpers::TEST_PRICE_INPUT),
        (
            "MAESTRA_LLM_PRICE_OUTPUT",
            crate::helpers::TEST_PRICE_OUTPUT,
        ),
    ];
    let url = crate::helpers::database_url(&db);
    let cloud = crate::helpers::spawn_cloud_app_at(&url, &url, &llm).await;
    let local = crate::helpers::spawn_app_with(&llm).await;
    for i in 0..2 {
        let body = json!({"user_id": "ana", "surface_id": "cli", "message": format!("m{i}")});
        assert_eq!(cloud.core(&cloud.api_key, &body).await.status(), 200);
        assert_eq!(local.post_core(&body).await.status(), 200);
    }
    let usage = |dir: &std::path::Path, vars: &[(&str, &str)], json: bool| {
        let mut command = maestra_command(dir, vars);
        command.arg("usage");
        if json {
            command.arg("--json");
        }
        let output = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout)
    };
    let home = tempfile::tempdir().unwrap();
    let cloud_vars = [("DATABASE_URL", url.as_str()), ("MAESTRA_MODE", "cloud")];
    let tables = [
        usage(local.data_dir.path(), &[], false),
        usage(home.path(), &cloud_vars, false),
    ];
    // 2 × (1200 prompt tokens at 2.5 USD + 340 completion tokens at 10 USD per million).
    for table in &tables {
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let header = &lines[0];
        assert_eq!(
            header[header.len() - 4..],
            ["requests", "prompt_tokens", "completion_tokens", "cost_usd"],
            "{table}"
        );
        assert_eq!(
            lines.last().unwrap(),
            &["total", "2", "2400", "680", "0.0128"],
            "{table}"
        );
        let row = &lines[1];
        assert_eq!(
            row[row.len() - 4..],
            ["2", "2400", "680", "0.0128"],
            "{table}"
        );
    }
    let reports: Vec<serde_json::Value> = [
        usage(local.data_dir.path(), &[], true),
        usage(home.path(), &cloud_vars, true),
    ]
    .iter()
    .map(|text| serde_json::from_str(text).unwrap())
    .collect();
    for report in &reports {
        assert_eq!(report["total"]["cost_usd"], 0.0128, "{report}");
        assert_eq!(report["skipped_lines"], 0, "{report}");
        assert_eq!(report["rows"][0]["cost_usd"], 0.0128, "{report}");
    }
}
