//! `maestra usage`: requests, tokens and cost per day and model. Local mode reads the ledger
//! file; cloud mode (MAESTRA_MODE=cloud) reads the `usage` table, per tenant and key too.

use std::io::{self, Write};

use chrono::NaiveDate;
use serde::Serialize;
use sqlx::{FromRow, PgPool};

use crate::config::Mode;
use crate::db;
use crate::usage_report;

pub fn run(opts: &usage_report::Opts) -> anyhow::Result<()> {
    let (settings, _telemetry) = super::quiet_settings()?;
    match settings.mode {
        Mode::Local => usage_report::run(opts, &settings.data_dir),
        Mode::Cloud => {
            let url = settings
                .replicas
                .direct_url(settings.require_database_url()?)
                .clone();
            super::one_shot_runtime()?.block_on(async {
                let pool = db::connect(&url, 1).await?;
                let rows = cloud_usage(&pool, opts.since).await?;
                print(&rows, opts.json)
            })
        }
    }
}

/// One day, tenant, key and model.
#[derive(Debug, FromRow, Serialize)]
pub struct CloudUsage {
    pub day: String,
    pub tenant: String,
    pub key: String,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

pub async fn cloud_usage(
    pool: &PgPool,
    since: Option<NaiveDate>,
) -> Result<Vec<CloudUsage>, sqlx::Error> {
    sqlx::query_as(
        "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, tenant_id AS tenant,
                COALESCE(api_key_id, '-') AS key, model, count(*) AS requests,
                sum(prompt_tokens)::bigint AS prompt_tokens,
                sum(completion_tokens)::bigint AS completion_tokens,
                sum(cost_usd) AS cost_usd
         FROM usage
         WHERE $1::date IS NULL OR ts >= $1::date
         GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
    )
    .bind(since)
    .fetch_all(pool)
    .await
}

fn print(rows: &[CloudUsage], json: bool) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    let written = if json {
        serde_json::to_writer_pretty(&mut out, rows).map_err(io::Error::from)
    } else {
        writeln!(
            out,
            "{:<10}  {:<16}  {:<16}  {:<24}  {:>8}  {:>13}  {:>17}  {:>10}",
            "day",
            "tenant",
            "key",
            "model",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd"
        )
        .and_then(|()| {
            rows.iter().try_for_each(|r| {
                writeln!(
                    out,
                    "{:<10}  {:<16}  {:<16}  {:<24}  {:>8}  {:>13}  {:>17}  {:>10.6}",
                    r.day,
                    r.tenant,
                    r.key,
                    r.model,
                    r.requests,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost_usd
                )
            })
        })
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
