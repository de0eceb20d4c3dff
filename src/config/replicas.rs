//! Settings for running cloud mode on several replicas: where the shared rate-limit state is,
//! how many replicas share a quota when Redis is away, and how Postgres is reached (directly,
//! or through a transaction-pooling PgBouncer).

use std::num::NonZeroU32;
use std::time::Duration;

use secrecy::SecretString;

use super::{ConfigError, Raw, non_empty, parse_count, parse_database_url};
use crate::ratelimit::{Backend, RateLimiter, RedisSettings};

/// How `DATABASE_URL` reaches Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// Postgres itself, or a pooler in session mode: a connection is one server session.
    Session,
    /// A pooler in transaction mode (PgBouncer `pool_mode = transaction`): consecutive
    /// transactions may run on different server sessions.
    Transaction,
}

#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub rate_limit_backend: Backend,
    /// `MAESTRA_REPLICAS`: the most replicas that run at once; while Redis is away each
    /// enforces `ceil(quota / replicas)`.
    pub replicas: NonZeroU32,
    pub db_pool_mode: PoolMode,
    /// A direct Postgres URL for what a transaction pooler cannot carry: migrations (session
    /// advisory lock) and the API key change feed (LISTEN). Required in transaction mode.
    pub database_direct_url: Option<SecretString>,
}

/// Long enough for a busy Redis on a busy host; short enough that a hung one costs each request
/// at most this once before the breaker opens.
const DEFAULT_REDIS_TIMEOUT_MS: u64 = 250;

pub(super) fn parse(raw: &Raw) -> Result<ReplicaSettings, ConfigError> {
    let backend = match raw
        .rate_limit_backend
        .as_deref()
        .map(str::trim)
        .unwrap_or("memory")
    {
        "memory" | "" => Backend::Memory,
        "redis" => {
            let url = non_empty(raw.redis_url.clone()).ok_or_else(|| {
                ConfigError::new(
                    "MAESTRA_REDIS_URL",
                    "required with MAESTRA_RATE_LIMIT_BACKEND=redis (e.g. redis://redis:6379)",
                )
            })?;
            let settings = RedisSettings {
                url: SecretString::from(url),
                cluster: parse_bool("MAESTRA_REDIS_CLUSTER", raw.redis_cluster.as_deref())?,
                timeout: Duration::from_millis(match raw.redis_timeout_ms.as_deref() {
                    None => DEFAULT_REDIS_TIMEOUT_MS,
                    Some(v) => u64::from(parse_count("MAESTRA_REDIS_TIMEOUT_MS", v)?.get()),
                }),
            };
            // The URL may hold a password: the problem is named, the URL never echoed.
            RateLimiter::validate(&settings).map_err(|_| {
                ConfigError::new(
                    "MAESTRA_REDIS_URL",
                    "must be redis://[user:password@]host[:port][/db] (or rediss://); several, comma separated, with MAESTRA_REDIS_CLUSTER=true",
                )
            })?;
            Backend::Redis(settings)
        }
        other => {
            return Err(ConfigError::new(
                "MAESTRA_RATE_LIMIT_BACKEND",
                format!("unknown backend {other:?} (expected \"memory\" or \"redis\")"),
            ));
        }
    };
    let db_pool_mode = match raw.db_pool_mode.as_deref().map(str::trim) {
        None | Some("" | "session") => PoolMode::Session,
        Some("transaction") => PoolMode::Transaction,
        Some(other) => {
            return Err(ConfigError::new(
                "MAESTRA_DB_POOL_MODE",
                format!("unknown mode {other:?} (expected \"session\" or \"transaction\")"),
            ));
        }
    };
    let database_direct_url = non_empty(raw.database_direct_url.clone())
        .map(|url| {
            parse_database_url(url)
                .map_err(|e| ConfigError::new("MAESTRA_DATABASE_DIRECT_URL", e.problem))
        })
        .transpose()?;
    if db_pool_mode == PoolMode::Transaction && database_direct_url.is_none() {
        return Err(ConfigError::new(
            "MAESTRA_DATABASE_DIRECT_URL",
            "required with MAESTRA_DB_POOL_MODE=transaction: migrations and key-change notifications need a direct connection to Postgres",
        ));
    }
    Ok(ReplicaSettings {
        rate_limit_backend: backend,
        replicas: match raw.replicas.as_deref() {
            None => NonZeroU32::MIN,
            Some(v) => parse_count("MAESTRA_REPLICAS", v)?,
        },
        db_pool_mode,
        database_direct_url,
    })
}

impl ReplicaSettings {
    /// The URL for migrations and LISTEN: the direct one if set, else `DATABASE_URL`.
    pub fn direct_url<'a>(&'a self, database_url: &'a SecretString) -> &'a SecretString {
        self.database_direct_url.as_ref().unwrap_or(database_url)
    }
}

fn parse_bool(variable: &str, value: Option<&str>) -> Result<bool, ConfigError> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "false" | "0" | "no") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some(_) => Err(ConfigError::new(variable, "must be true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::load;
    use super::*;

    const CLOUD: [(&str, &str); 2] = [
        ("MAESTRA_MODE", "cloud"),
        ("DATABASE_URL", "postgres://maestra:hunter2@db/maestra"),
    ];

    fn cloud(extra: &[(&str, &str)]) -> Result<crate::config::Settings, ConfigError> {
        let mut vars = CLOUD.to_vec();
        vars.extend_from_slice(extra);
        load(&vars)
    }

    #[test]
    fn by_default_one_replica_limits_in_memory_and_talks_to_postgres_directly() {
        let settings = cloud(&[]).unwrap();
        assert!(matches!(
            settings.replicas.rate_limit_backend,
            Backend::Memory
        ));
        assert_eq!(settings.replicas.replicas.get(), 1);
        assert_eq!(settings.replicas.db_pool_mode, PoolMode::Session);
    }

    #[test]
    fn the_redis_backend_reads_its_url_cluster_flag_and_deadline() {
        let settings = cloud(&[
            ("MAESTRA_RATE_LIMIT_BACKEND", "redis"),
            ("MAESTRA_REDIS_URL", "redis://a:7000, redis://b:7001"),
            ("MAESTRA_REDIS_CLUSTER", "true"),
            ("MAESTRA_REDIS_TIMEOUT_MS", "50"),
            ("MAESTRA_REPLICAS", "3"),
        ])
        .unwrap();
        let Backend::Redis(redis) = &settings.replicas.rate_limit_backend else {
            panic!("expected redis");
        };
        assert!(redis.cluster);
        assert_eq!(redis.timeout, Duration::from_millis(50));
        assert_eq!(settings.replicas.replicas.get(), 3);
    }

    #[test]
    fn each_bad_value_names_its_variable_and_never_echoes_a_password() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("MAESTRA_RATE_LIMIT_BACKEND", "etcd")],
                "MAESTRA_RATE_LIMIT_BACKEND",
            ),
            (
                &[("MAESTRA_RATE_LIMIT_BACKEND", "redis")],
                "MAESTRA_REDIS_URL",
            ),
            (
                &[
                    ("MAESTRA_RATE_LIMIT_BACKEND", "redis"),
                    ("MAESTRA_REDIS_URL", "http://user:s3cret@redis"),
                ],
                "MAESTRA_REDIS_URL",
            ),
            (
                &[
                    ("MAESTRA_RATE_LIMIT_BACKEND", "redis"),
                    ("MAESTRA_REDIS_URL", "redis://r"),
                    ("MAESTRA_REDIS_TIMEOUT_MS", "0"),
                ],
                "MAESTRA_REDIS_TIMEOUT_MS",
            ),
            (&[("MAESTRA_REPLICAS", "0")], "MAESTRA_REPLICAS"),
            (
                &[("MAESTRA_DB_POOL_MODE", "statement")],
                "MAESTRA_DB_POOL_MODE",
            ),
            (
                &[("MAESTRA_DB_POOL_MODE", "transaction")],
                "MAESTRA_DATABASE_DIRECT_URL",
            ),
            (
                &[("MAESTRA_DATABASE_DIRECT_URL", "mysql://root:s3cret@db")],
                "MAESTRA_DATABASE_DIRECT_URL",
            ),
        ];
        for (vars, variable) in cases {
            let err = cloud(vars).unwrap_err();
            assert_eq!(err.variable, *variable, "{vars:?}: {err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }
}
