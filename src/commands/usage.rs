//! `maestra usage`: requests, tokens and cost per day and model. Local mode reads the ledger
//! file; cloud mode (MAESTRA_MODE=cloud) reads the `usage` table, per tenant and key too.

use anyhow::Context;
use chrono::NaiveDate;
use sqlx::{FromRow, PgPool};

use crate::config::Mode;
use crate::db;
use crate::usage_report::{self, Summary};

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
                summary(rows)?.print(opts.json)
            })
        }
    }
}

/// The cloud table's grouping.
pub const CLOUD_COLUMNS: &[&str] = &["day", "tenant", "key", "model"];

/// One day, tenant, key and model.
#[derive(Debug, FromRow)]
pub struct CloudUsage {
    pub day: String,
    pub tenant: String,
    pub key: String,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Whole pico-dollars, each request's cost rounded as the local ledger's are, as text
    /// (the sum may exceed a bigint).
    pub cost_pico: String,
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
                sum(round(greatest(cost_usd, 0)::numeric * 1000000000000))::text AS cost_pico
         FROM usage
         WHERE $1::date IS NULL OR ts >= $1::date
         GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
    )
    .bind(since)
    .fetch_all(pool)
    .await
}

/// The rows in the report local mode prints too: same columns of numbers, same total row,
/// same cost format.
pub fn summary(rows: Vec<CloudUsage>) -> anyhow::Result<Summary> {
    let mut summary = Summary::new(CLOUD_COLUMNS);
    for row in rows {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let cost_pico: u128 = row.cost_pico.parse().with_context(|| {
            format!(
                "the usage table holds an unreadable cost {:?}",
                row.cost_pico
            )
        })?;
        summary.add(
            vec![row.day, row.tenant, row.key, row.model],
            count(row.requests),
            count(row.prompt_tokens),
            count(row.completion_tokens),
            cost_pico,
        );
    }
    Ok(summary)
}
