//! The shared store: one Lua script decides each request inside Redis, on Redis's own clock
//! (`TIME`), so every replica draws on the same budget and replica clock skew cannot matter.
//! The key is `maestra:rl:{<subject>}:<bucket>`: the hash tag puts all of a subject's buckets
//! in one Redis Cluster slot. Works on a single Redis and on a Redis Cluster.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script};
use secrecy::{ExposeSecret, SecretString};

use super::gcra::Gcra;

/// GCRA over whole microseconds, as `Gcra::decide`: KEYS[1] the subject's bucket, ARGV[1] the
/// emission interval `t`, ARGV[2] the tolerance `tau`, ARGV[3] `1` to count the request or
/// `0` only to ask whether it would pass. Returns `{allowed, tat - now}`.
/// The TAT is stored as an integer string (`%.0f`: Lua's default number format would round
/// it) and expires once it is in the past, when the key is as good as fresh.
const SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat - now > tau then
  return {0, tat - now}
end
local next = math.max(tat, now) + t
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000))
end
return {1, next - now}
";

/// Why a call to Redis did not give a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the deadline.
    Timeout,
    /// Not connected (yet, or any more).
    Unreachable,
    /// Redis answered with an error, or the answer made no sense.
    Error,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Unreachable => "unreachable",
            Failure::Error => "error",
        }
    }

    fn of(error: &RedisError) -> Self {
        if error.is_timeout() {
            Failure::Timeout
        } else if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_unrecoverable_error()
        {
            Failure::Unreachable
        } else {
            Failure::Error
        }
    }
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Where the shared state lives and how long to wait for it. `Debug` redacts the URL.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// One URL, or (cluster) several seed nodes separated by commas. May hold a password.
    pub url: SecretString,
    pub cluster: bool,
    /// Each call's deadline.
    pub timeout: Duration,
}

pub struct RedisStore {
    settings: RedisSettings,
    script: Script,
    /// Made lazily (Redis may be down at start); cloned per call (both kinds multiplex).
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// The last connection attempt's error, reported once by whoever asks.
    connect_error: Mutex<Option<String>>,
}

impl RedisStore {
    pub fn new(settings: RedisSettings) -> Self {
        Self {
            settings,
            script: Script::new(SCRIPT),
            connection: tokio::sync::Mutex::new(None),
            connect_error: Mutex::new(None),
        }
    }

    /// The URL's problems, found without connecting (start-up names the variable).
    pub fn validate(settings: &RedisSettings) -> Result<(), String> {
        for url in seeds(&settings.url) {
            redis::Client::open(url).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Decides one request in Redis: `(allowed, tat - now)` in µs, or why not.
    pub async fn check(
        &self,
        bucket: &str,
        subject: &str,
        gcra: Gcra,
        consume: bool,
    ) -> Result<(bool, u64), Failure> {
        let key = format!("maestra:rl:{{{subject}}}:{bucket}");
        let mut invocation = self.script.key(key);
        invocation.arg(gcra.t).arg(gcra.tau).arg(u8::from(consume));
        let call = async {
            let connection = self.connection().await?;
            let reply: Result<(i64, i64), RedisError> = match connection {
                Connection::Single(mut c) => invocation.invoke_async(&mut c).await,
                Connection::Cluster(mut c) => invocation.invoke_async(&mut c).await,
            };
            match reply {
                Ok((allowed, ahead)) => Ok((allowed == 1, u64::try_from(ahead).unwrap_or(0))),
                Err(e) => Err(Failure::of(&e)),
            }
        };
        tokio::time::timeout(self.settings.timeout, call)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    /// Whether Redis answers a PING within the deadline (the breaker's probe).
    pub async fn ping(&self) -> Result<(), Failure> {
        let call = async {
            let connection = self.connection().await?;
            let ping = redis::cmd("PING");
            let reply: Result<String, RedisError> = match connection {
                Connection::Single(mut c) => ping.query_async(&mut c).await,
                Connection::Cluster(mut c) => ping.query_async(&mut c).await,
            };
            reply.map(drop).map_err(|e| Failure::of(&e))
        };
        tokio::time::timeout(self.settings.timeout, call)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    /// The connection, made now if there is none. One attempt at a time; a failed one is
    /// remembered for `take_connect_error`.
    async fn connection(&self) -> Result<Connection, Failure> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        match self.connect().await {
            Ok(connection) => {
                *slot = Some(connection.clone());
                Ok(connection)
            }
            Err(e) => {
                *self.connect_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                Err(Failure::Unreachable)
            }
        }
    }

    /// The reason the last connection attempt failed, once.
    pub fn take_connect_error(&self) -> Option<String> {
        self.connect_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn connect(&self) -> Result<Connection, String> {
        let timeout = self.settings.timeout;
        // Connecting may take a handshake or two more than a command.
        let connect_timeout = (timeout * 4).max(Duration::from_millis(500));
        let seeds = seeds(&self.settings.url);
        let attempt = async {
            if self.settings.cluster {
                let client = ClusterClientBuilder::new(seeds)
                    .connection_timeout(connect_timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()
                    .map_err(|e| e.to_string())?;
                client
                    .get_async_connection()
                    .await
                    .map(Connection::Cluster)
                    .map_err(|e| e.to_string())
            } else {
                let url = seeds.into_iter().next().unwrap_or_default();
                let client = redis::Client::open(url).map_err(|e| e.to_string())?;
                // Reconnects in the background after a drop, quickly: the breaker's probe
                // is what notices Redis is back.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map(Connection::Single)
                    .map_err(|e| e.to_string())
            }
        };
        tokio::time::timeout(connect_timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {connect_timeout:?}")))
    }
}

fn seeds(url: &SecretString) -> Vec<String> {
    url.expose_secret()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}
