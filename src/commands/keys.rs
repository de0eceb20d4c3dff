//! `maestra keys`: operators create, list, revoke and rotate cloud API keys.
//! A new key is printed once, on stdout (alone, so `KEY=$(maestra keys create …)` works);
//! everything else goes to stderr.

use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::{Context, anyhow};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;

use crate::auth::KeyId;
use crate::auth::repository::{self, KeyRow, NewKey};
use crate::db;
use crate::domain::TenantId;
use crate::ratelimit::Quota;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key for a tenant (the tenant is created if new). Prints the key once.
    Create(CreateArgs),
    /// List keys (never their secrets): state, quota, last use.
    List {
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key now.
    Revoke {
        /// The key's id, as `keys list` shows it.
        id: String,
    },
    /// Issue a new key with the same tenant, label and quota; the old one keeps working for
    /// the grace period. Prints the new key once.
    Rotate {
        /// The key's id, as `keys list` shows it.
        id: String,
        /// How long the old key keeps working, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        grace: Duration,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The tenant the key belongs to.
    #[arg(long)]
    tenant: String,
    /// A note for operators, e.g. "mobile app".
    #[arg(long)]
    label: Option<String>,
    /// This key's own quota as REQUESTS/SECONDS, e.g. 1000/60 (default: the server's).
    #[arg(long, value_parser = parse_quota)]
    rate_limit: Option<Quota>,
    /// The key stops working after this long, e.g. 90d (more than 0).
    #[arg(long, value_parser = parse_lifetime)]
    expires_in: Option<Duration>,
}

pub fn run(command: KeysCommand) -> anyhow::Result<()> {
    let (settings, _telemetry) = super::quiet_settings()?;
    let url = settings
        .replicas
        .direct_url(settings.require_database_url()?)
        .clone();
    super::one_shot_runtime()?.block_on(async {
        let pool = db::connect(&url, 2).await?;
        db::migrate(&pool).await?;
        match command {
            KeysCommand::Create(args) => create(&pool, args).await,
            KeysCommand::List { tenant } => list(&pool, tenant).await,
            KeysCommand::Revoke { id } => revoke(&pool, &id).await,
            KeysCommand::Rotate { id, grace } => rotate(&pool, &id, grace).await,
        }
    })
}

async fn create(pool: &PgPool, args: CreateArgs) -> anyhow::Result<()> {
    let tenant = TenantId::parse(&args.tenant).map_err(|e| anyhow!("--{e}"))?;
    let expires_at = args
        .expires_in
        .map(|d| chrono::Duration::from_std(d).map(|d| Utc::now() + d))
        .transpose()
        .context("--expires-in is too long")?;
    let new = NewKey {
        tenant: tenant.to_string(),
        label: args.label,
        quota: args.rate_limit,
        expires_at,
    };
    let (id, key) = repository::create(pool, &new).await?;
    eprintln!(
        "created key {id} for tenant {tenant}{}; it is shown only now, store it safely:",
        expires_at
            .map(|t| format!(", expiring {}", when(t)))
            .unwrap_or_default()
    );
    print_key(&key);
    Ok(())
}

async fn list(pool: &PgPool, tenant: Option<String>) -> anyhow::Result<()> {
    let rows = repository::list(pool, tenant.as_deref()).await?;
    let now = Utc::now();
    println!(
        "{:<16}  {:<16}  {:<20}  {:<12}  {:<20}  {:<20}  {:<20}  STATE",
        "ID", "TENANT", "LABEL", "RATE LIMIT", "CREATED", "LAST USED", "EXPIRES"
    );
    for row in &rows {
        println!(
            "{:<16}  {:<16}  {:<20}  {:<12}  {:<20}  {:<20}  {:<20}  {}",
            row.id,
            row.tenant_id,
            row.label.as_deref().unwrap_or("-"),
            quota_text(row),
            when(row.created_at),
            row.last_used_at
                .map(when)
                .unwrap_or_else(|| "never".to_owned()),
            row.expires_at
                .map(when)
                .unwrap_or_else(|| "never".to_owned()),
            row.state_at(now),
        );
    }
    eprintln!("{} key(s)", rows.len());
    Ok(())
}

async fn revoke(pool: &PgPool, id: &str) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let row = repository::revoke(pool, &id).await?;
    eprintln!("key {id} of tenant {} is revoked", row.tenant_id);
    Ok(())
}

async fn rotate(pool: &PgPool, id: &str, grace: Duration) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let (new_id, key, old_until) = repository::rotate(pool, &id, grace).await?;
    eprintln!(
        "key {new_id} replaces {id}, which keeps working until {}; the new key is shown only now:",
        when(old_until)
    );
    print_key(&key);
    Ok(())
}

fn print_key(key: &SecretString) {
    println!("{}", key.expose_secret());
}

fn parse_id(text: &str) -> anyhow::Result<KeyId> {
    KeyId::parse(text).ok_or_else(|| anyhow!("{text:?} is not a key id (see `maestra keys list`)"))
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn quota_text(row: &KeyRow) -> String {
    row.quota_override()
        .map(|q| format!("{}/{}s", q.requests, q.window.as_secs()))
        .unwrap_or_else(|| "default".to_owned())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 30s, 15m, 24h, 7d)"))
}

/// A key's lifetime: a key that is expired when it is created is a mistake, not a key.
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        zero if zero.is_zero() => Err("must be longer than 0 (e.g. 90d)".to_owned()),
        lifetime => Ok(lifetime),
    }
}

fn parse_quota(text: &str) -> Result<Quota, String> {
    let invalid = || format!("{text:?} is not REQUESTS/SECONDS, e.g. 1000/60");
    let (requests, seconds) = text.split_once('/').ok_or_else(invalid)?;
    let requests: NonZeroU32 = requests.trim().parse().map_err(|_| invalid())?;
    let seconds: NonZeroU32 = seconds.trim().parse().map_err(|_| invalid())?;
    Ok(Quota {
        requests,
        window: Duration::from_secs(u64::from(seconds.get())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_read_as_requests_per_seconds() {
        let quota = parse_quota("1000/60").unwrap();
        assert_eq!(quota.requests.get(), 1000);
        assert_eq!(quota.window, Duration::from_secs(60));
        for bad in ["1000", "0/60", "10/0", "ten/60", "10/-1"] {
            assert!(parse_quota(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_are_human() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn a_key_cannot_be_created_already_expired() {
        assert!(parse_lifetime("0s").is_err());
        assert!(parse_lifetime("0d").is_err());
        assert_eq!(parse_lifetime("1s").unwrap(), Duration::from_secs(1));
    }
}
