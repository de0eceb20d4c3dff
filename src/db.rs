//! The cloud database: connecting with errors a person can act on, applying migrations, and
//! `Db`, the handle the service queries through (directly, or via a transaction pooler).

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use secrecy::{ExposeSecret, SecretString};
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow, PgStatement, PgTypeInfo,
};
use sqlx::{Describe, Either, Execute, Executor, PgPool, Postgres, Transaction};

use crate::config::PoolMode;

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long start-up waits for the database before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects, or says in one line why not. The URL itself never appears in the error
/// (it may hold a password).
pub async fn connect(url: &SecretString, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_in("DATABASE_URL", url, max_connections, PoolMode::Session).await
}

/// `connect`, for a URL that may reach Postgres through a transaction pooler: then sqlx's
/// statement cache is off (a cached statement would be looked for on another server session).
pub async fn connect_in(
    variable: &str,
    url: &SecretString,
    max_connections: u32,
    mode: PoolMode,
) -> anyhow::Result<PgPool> {
    let mut options: PgConnectOptions = url
        .expose_secret()
        .parse()
        .map_err(|e| anyhow!("{variable}: not a valid Postgres URL ({e})"))?;
    if mode == PoolMode::Transaction {
        options = options.statement_cache_capacity(0);
    }
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .connect_lazy_with(options);
    let check = Db::new(pool.clone(), mode);
    tokio::time::timeout(CONNECT_TIMEOUT, sqlx::query("SELECT 1").execute(&check))
        .await
        .map_err(|_| anyhow!("{variable}: the database did not answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| anyhow!("{variable}: cannot reach the database: {e}"))?;
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

/// The pool the service queries through. With Postgres itself (or a session pooler) it is the
/// sqlx pool, unchanged. Behind a transaction pooler (PgBouncer `pool_mode = transaction`,
/// whose Debian 12 version 1.18 does not track prepared statements) each statement needs two
/// things sqlx does not do by itself:
/// - one server session from its Parse to its Execute: sqlx sends them in two round trips,
///   and the pooler may hand the second to another session once the first ends outside a
///   transaction. So a statement run on the pool runs in its own `BEGIN … COMMIT`, committed
///   before it returns.
/// - no named statement left for another client to collide with: statements run on the pool
///   are unnamed, and every transaction starts with `DEALLOCATE ALL`, clearing what earlier
///   transactions of any client left on that session (sqlx names the statements of explicit
///   transactions and of its own type look-ups; its cache is off, so nothing it remembers
///   goes stale).
///
/// Each HTTP worker thread may have a pool of its own (`with_worker_pools`): a connection's
/// socket belongs to the runtime that opened it, and one used from another runtime (another
/// worker, or the start-up runtime) wakes that runtime's thread for every reply it gets.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
    /// By worker index (see `enter_worker`); empty when all threads share `pool`.
    workers: Arc<[PgPool]>,
    mode: PoolMode,
}

thread_local! {
    /// The HTTP worker this thread runs, if it runs one.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the current thread as HTTP worker `index`: its queries go to that worker's pool.
pub fn enter_worker(index: usize) {
    WORKER.with(|worker| worker.set(Some(index)));
}

/// How `max_connections` splits: a share for each of `workers` threads (at least
/// `MIN_PER_WORKER`, else all share one pool) and the rest for start-up and background work
/// (the key change feed holds one for good).
const SHARED_CONNECTIONS: u32 = 2;
const MIN_PER_WORKER: u32 = 2;

/// The connections each worker's pool may open, and those left for the shared pool; `None`
/// when the budget is too small to split.
pub fn split_connections(max_connections: u32, workers: usize) -> Option<(u32, u32)> {
    let workers = u32::try_from(workers).ok().filter(|&n| n > 0)?;
    let each = max_connections.checked_sub(SHARED_CONNECTIONS)? / workers;
    (each >= MIN_PER_WORKER).then(|| (each, max_connections - each * workers))
}

impl Db {
    pub fn new(pool: PgPool, mode: PoolMode) -> Self {
        Self {
            pool,
            workers: Arc::from([]),
            mode,
        }
    }

    /// Gives each of `workers` HTTP workers a pool of `each` connections to the same database
    /// as the shared pool. They connect lazily: on the worker, when it first queries.
    pub fn with_worker_pools(mut self, workers: usize, each: u32) -> Self {
        let options = self.pool.connect_options();
        self.workers = (0..workers)
            .map(|_| {
                self.pool
                    .options()
                    .clone()
                    .max_connections(each)
                    .connect_lazy_with((*options).clone())
            })
            .collect();
        self
    }

    /// The current thread's pool.
    pub fn pool(&self) -> &PgPool {
        WORKER
            .with(Cell::get)
            .and_then(|index| self.workers.get(index))
            .unwrap_or(&self.pool)
    }

    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        begin(self.pool(), self.mode).await
    }
}

impl From<PgPool> for Db {
    fn from(pool: PgPool) -> Self {
        Self::new(pool, PoolMode::Session)
    }
}

async fn begin(
    pool: &PgPool,
    mode: PoolMode,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    match mode {
        PoolMode::Session => pool.begin().await,
        // One simple query, one round trip: the session is pinned from here on.
        PoolMode::Transaction => pool.begin_with("BEGIN; DEALLOCATE ALL").await,
    }
}

/// A statement run as an unnamed prepared statement (nothing outlives it on the server).
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(&self) -> &'q str {
        self.0.sql()
    }

    fn statement(&self) -> Option<&PgStatement<'q>> {
        self.0.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<PgArguments>, BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

impl<'c> Executor<'c> for &'c Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if self.mode == PoolMode::Session {
            return self.pool().fetch_many(query);
        }
        let pool = self.pool().clone();
        // Collected, then committed, then handed out: a write is durable when this returns.
        stream::once(async move {
            let mut tx = begin(&pool, PoolMode::Transaction).await?;
            let all: Vec<_> = (&mut *tx).fetch_many(Unnamed(query)).try_collect().await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(stream::iter(all.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if self.mode == PoolMode::Session {
            return self.pool().fetch_optional(query);
        }
        let pool = self.pool().clone();
        Box::pin(async move {
            let mut tx = begin(&pool, PoolMode::Transaction).await?;
            let row = (&mut *tx).fetch_optional(Unnamed(query)).await?;
            tx.commit().await?;
            Ok(row)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        self.pool().prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        self.pool().describe(sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_splits_into_worker_shares_of_two_or_more_and_the_rest_is_shared() {
        for (max, workers, split) in [
            (10, 2, Some((4, 2))),
            (11, 2, Some((4, 3))),
            (10, 4, Some((2, 2))),
            (10, 5, None),
            (4, 1, Some((2, 2))),
            (3, 1, None),
            (1, 2, None),
            (10, 0, None),
        ] {
            assert_eq!(
                split_connections(max, workers),
                split,
                "{max} over {workers}"
            );
            if let Some((each, shared)) = split {
                assert_eq!(each * workers as u32 + shared, max);
            }
        }
    }

    #[tokio::test]
    async fn a_worker_thread_queries_through_its_own_pool_and_other_threads_share_one() {
        // Lazy pools: nothing connects, so no database is needed.
        let options: PgConnectOptions = "postgres://nobody@127.0.0.1:1/none".parse().unwrap();
        let shared = PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy_with(options);
        let db = Db::new(shared, PoolMode::Session).with_worker_pools(2, 3);
        assert!(std::ptr::eq(db.pool(), &db.pool));
        let on_worker = |index| {
            let db = db.clone();
            std::thread::spawn(move || {
                enter_worker(index);
                let pool = db.pool();
                (
                    std::ptr::eq(pool, &db.workers[index]),
                    pool.options().get_max_connections(),
                )
            })
            .join()
            .unwrap()
        };
        assert_eq!(on_worker(0), (true, 3));
        assert_eq!(on_worker(1), (true, 3));
        assert!(!std::ptr::eq(&db.workers[0], &db.workers[1]));
    }
}
