//! The cloud database: connecting with errors a person can act on, and applying migrations.

use std::time::Duration;

use anyhow::{Context, anyhow};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long start-up waits for the database before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects, or says in one line why not. The URL itself never appears in the error
/// (it may hold a password).
pub async fn connect(url: &SecretString, max_connections: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .expose_secret()
        .parse()
        .map_err(|e| anyhow!("DATABASE_URL: not a valid Postgres URL ({e})"))?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .connect_lazy_with(options);
    tokio::time::timeout(CONNECT_TIMEOUT, sqlx::query("SELECT 1").execute(&pool))
        .await
        .map_err(|_| {
            anyhow!("DATABASE_URL: the database did not answer within {CONNECT_TIMEOUT:?}")
        })?
        .map_err(|e| anyhow!("DATABASE_URL: cannot reach the database: {e}"))?;
    Ok(pool)
}

/// Applies pending migrations. Safe when several replicas start at once: sqlx holds a
/// Postgres advisory lock while migrating.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("cannot apply the database migrations")
}
