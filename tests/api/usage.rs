//! `maestra usage` as a user runs it, over a ledger written by the server.

use serde_json::{Value, json};

use crate::fake_provider::{FakeProvider, Step};
use crate::helpers::{maestra_command, spawn_app_with_provider};

#[tokio::test]
async fn usage_reports_what_the_server_recorded_per_day_and_model() {
    let provider = FakeProvider::start(Step::reply("Counted.")).await;
    let app = spawn_app_with_provider(&provider.base_url, &[]).await;
    let mut cost = 0.0;
    for i in 0..3 {
        let body = app
            .say("ana", "cli", Some("conv_u"), &format!("q{i}"))
            .await;
        cost += body["usage"]["cost_usd"].as_f64().unwrap();
    }
    // A damaged line is skipped and counted, not fatal.
    let ledger = app.data_dir.path().join("maestra_metrics.jsonl");
    let mut text = std::fs::read_to_string(&ledger).unwrap();
    text.push_str("{\"torn\": \n");
    std::fs::write(&ledger, text).unwrap();

    let output = maestra_command(app.data_dir.path(), &[])
        .args(["usage", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["model"], "fake-model-2026-01-01");
    assert_eq!(rows[0]["requests"], 3);
    assert_eq!(rows[0]["prompt_tokens"], 3 * 1200);
    // Summed exactly: 3 x 0.0064, where adding the floats would drift.
    assert_eq!(report["total"]["cost_usd"], json!(0.0192));
    assert!((cost - 0.0192_f64).abs() < 1e-12);
    assert_eq!(report["skipped_lines"], 1);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("skipped 1 unreadable line"), "{stderr}");

    let table = maestra_command(app.data_dir.path(), &[])
        .args(["usage", "--since", "2000-01-01"])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.lines().next().unwrap().starts_with("day"), "{table}");
    assert!(table.contains("fake-model-2026-01-01"), "{table}");
}

#[test]
fn usage_with_no_ledger_is_an_empty_report_and_a_bad_date_a_usage_error() {
    let data = tempfile::tempdir().unwrap();
    let output = maestra_command(data.path(), &[])
        .args(["usage", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["total"]["requests"], 0);

    let status = maestra_command(data.path(), &[])
        .args(["usage", "--since", "yesterday"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}
