//! `maestra health`: the local and the cloud backend side by side. Exit 0 when at least one is
//! healthy, 1 otherwise.

use clap::Args;

use super::one_shot_runtime;
use crate::client::{BackendHealth, ClientSettings, HealthReport, MaestraClient};

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: HealthArgs) -> anyhow::Result<()> {
    let _telemetry = super::client_logs()?;
    let settings = ClientSettings::from_env()?;
    let client = MaestraClient::new(&settings)?;
    let report = one_shot_runtime()?.block_on(client.health());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    if report.any_healthy() {
        Ok(())
    } else {
        anyhow::bail!("no backend is healthy")
    }
}

fn table(report: &HealthReport) -> String {
    let header = [
        "BACKEND", "URL", "STATUS", "VERSION", "MODE", "LATENCY", "DETAIL",
    ]
    .map(String::from);
    let mut rows = vec![header, row(&report.local)];
    match &report.cloud {
        Some(cloud) => rows.push(row(cloud)),
        None => rows.push(
            [
                "cloud",
                "-",
                "not configured",
                "-",
                "-",
                "-",
                "set MAESTRA_CLOUD_URL",
            ]
            .map(String::from),
        ),
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if let Some(sync) = &report.local.sync {
        let text = |name: &str| sync.get(name).and_then(|v| v.as_str()).unwrap_or("-");
        out.push_str(&format!(
            "sync with the cloud: {} (pending {}, last success {})\n",
            text("state"),
            sync.get("pending")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            text("last_success")
        ));
    }
    out.push_str(&format!(
        "fallback to the cloud: {}\n",
        if report.fallback_enabled {
            "enabled"
        } else {
            "disabled (MAESTRA_FALLBACK_ENABLED)"
        }
    ));
    out
}

fn row(health: &BackendHealth) -> [String; 7] {
    let or_dash = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".to_owned());
    [
        health.backend.to_string(),
        health.url.clone(),
        health.status.clone(),
        or_dash(&health.version),
        or_dash(&health.mode),
        health
            .latency_ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms")),
        or_dash(&health.detail),
    ]
}
