//! Settings: `config/default.toml`, then `config/<mode>.toml` (both compiled in), then the same
//! files from `$MAESTRA_CONFIG_DIR` if set, then `MAESTRA_*` environment variables.
//!
//! Every value is read as text and parsed here, so a bad one stops start-up with one line that
//! names the variable to fix. Loading reads and never writes.

mod llm;
mod replicas;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use std::num::NonZeroU32;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::ratelimit::Quota;

pub use llm::{LlmSettings, ProviderSettings};
pub use replicas::{PoolMode, ReplicaSettings};

const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const LOCAL_TOML: &str = include_str!("../config/local.toml");
const CLOUD_TOML: &str = include_str!("../config/cloud.toml");
/// The shortest `MAESTRA_API_KEY` accepted (the guide's example, `sk_your_key_here`, has 16).
const MIN_API_KEY_LEN: usize = 16;

/// A setting that cannot be used, named by the environment variable that sets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: String,
    pub problem: String,
}

impl ConfigError {
    fn new(variable: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            variable: variable.into(),
            problem: problem.into(),
        }
    }

    /// Names the file a bad value came from, when it came from one (`max_message_bytes in
    /// /etc/maestra/local.toml`) rather than from its variable.
    fn located(self, origins: &Origins) -> Self {
        let key = match self.variable.strip_prefix("MAESTRA_") {
            Some(rest) => rest.to_ascii_lowercase(),
            None => self.variable.to_ascii_lowercase(),
        };
        match origins.get(&key) {
            Some(file) => Self {
                variable: format!("{key} in {file}"),
                problem: self.problem,
            },
            None => self,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Local,
    Cloud,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Cloud => "cloud",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortChoice {
    /// `MAESTRA_PORT`; 0 lets the system pick a free port.
    Fixed(u16),
    /// The first port of the range that is free.
    FirstFree(RangeInclusive<u16>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// Every setting. Secrets are `SecretString`: their `Debug` prints `[REDACTED]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub host: IpAddr,
    pub port: PortChoice,
    /// Local mode's data folder (cloud mode keeps nothing on disk).
    pub data_dir: PathBuf,
    pub max_message_bytes: usize,
    pub history_messages: usize,
    pub cors_origins: Vec<String>,
    /// Browser extensions CORS admits, by id; empty: every extension.
    pub cors_extension_ids: Vec<String>,
    pub log: LogSettings,
    /// Cloud mode's database; required there, and by `maestra migrate` and `maestra keys`.
    pub database_url: Option<SecretString>,
    /// Cloud mode: a key ensured for the default tenant at start.
    pub api_key: Option<SecretString>,
    /// Cloud mode: every key's quota unless its row sets its own.
    pub rate_limit: Quota,
    /// Cloud mode: failed authentications each client address may make per 60 s.
    pub auth_failure_limit: NonZeroU32,
    pub db_max_connections: u32,
    pub auth_cache_ttl: Duration,
    /// Cloud mode: `/metrics` answers only `Authorization: Bearer <this>`; unset, it is off.
    pub metrics_token: Option<SecretString>,
    /// After SIGTERM, how long `/health/ready` says 503 before the server stops accepting.
    pub drain: Duration,
    /// How long a request body may take to arrive (slow clients are cut off with 408).
    pub body_timeout: Duration,
    pub llm: LlmSettings,
    pub sync: SyncSettings,
    /// Cloud mode on several replicas: the rate limiter's store, Postgres through a pooler.
    pub replicas: ReplicaSettings,
}

/// Sync between a local server and the cloud (see `crate::sync`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// Local mode: whether to sync once `maestra sync setup` linked a cloud (`MAESTRA_SYNC`).
    pub enabled: bool,
    /// Local mode: how often to look for the cloud's changes (and retry) when idle.
    pub interval: Duration,
    /// Local mode: records per push and per pull page (1-500).
    pub batch: usize,
    /// Cloud mode: each key's quota for sync requests, apart from its chat quota.
    pub quota: Quota,
}

impl Settings {
    /// The database URL, or the error that says how to give one.
    pub fn require_database_url(&self) -> Result<&SecretString, ConfigError> {
        self.database_url.as_ref().ok_or_else(|| {
            ConfigError::new(
                "DATABASE_URL",
                "required (e.g. postgres://user:password@host:5432/maestra)",
            )
        })
    }
}

/// The layered values before parsing: text, exactly as written in a file or variable.
/// No `Debug`: it holds secrets in the clear.
#[derive(Default, Deserialize)]
struct Raw {
    mode: Option<String>,
    host: Option<String>,
    port: Option<String>,
    port_range: Option<String>,
    data_dir: Option<String>,
    max_message_bytes: Option<String>,
    history_messages: Option<String>,
    cors_origins: Option<String>,
    cors_extension_ids: Option<String>,
    log_format: Option<String>,
    log_level: Option<String>,
    database_url: Option<String>,
    api_key: Option<String>,
    rate_limit_requests: Option<String>,
    rate_limit_window: Option<String>,
    auth_failure_limit: Option<String>,
    db_max_connections: Option<String>,
    auth_cache_ttl_seconds: Option<String>,
    metrics_token: Option<String>,
    drain_seconds: Option<String>,
    body_timeout_seconds: Option<String>,
    sync: Option<String>,
    sync_interval: Option<String>,
    sync_batch: Option<String>,
    sync_rate_limit_requests: Option<String>,
    sync_rate_limit_window: Option<String>,
    // Several replicas (parsed in config/replicas.rs).
    rate_limit_backend: Option<String>,
    redis_url: Option<String>,
    redis_cluster: Option<String>,
    redis_timeout_ms: Option<String>,
    replicas: Option<String>,
    db_pool_mode: Option<String>,
    database_direct_url: Option<String>,
    // The model provider (parsed in config/llm.rs).
    history_chars: Option<String>,
    llm_base_url: Option<String>,
    llm_api_key: Option<SecretString>,
    llm_model: Option<String>,
    llm_system_prompt: Option<String>,
    llm_connect_timeout: Option<String>,
    llm_request_timeout: Option<String>,
    llm_max_retries: Option<String>,
    llm_price_input: Option<String>,
    llm_price_output: Option<String>,
    llm_prices: Option<BTreeMap<String, llm::RawPrice>>,
}

impl Settings {
    /// Settings from the files and this process's environment.
    pub fn load() -> Result<Self, ConfigError> {
        // vars() would panic on a variable that is not UTF-8; such a variable is not ours.
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Self::load_from(vars)
    }

    /// Settings from the files and the given variables (tests pass their own).
    pub fn load_from(vars: HashMap<String, String>) -> Result<Self, ConfigError> {
        let config_dir = vars
            .get("MAESTRA_CONFIG_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if let Some(dir) = config_dir.as_ref().filter(|dir| !dir.is_dir()) {
            return Err(ConfigError::new(
                "MAESTRA_CONFIG_DIR",
                format!("{} is not a folder", dir.display()),
            ));
        }

        // The mode picks the second layer, so it is read first from the first layer and env.
        let (first, origins) = layered(&[("default", DEFAULT_TOML)], config_dir.as_deref(), &vars)?;
        let mode = parse_mode(first.mode.as_deref()).map_err(|e| e.located(&origins))?;
        let mode_layer = match mode {
            Mode::Local => ("local", LOCAL_TOML),
            Mode::Cloud => ("cloud", CLOUD_TOML),
        };
        let (mut raw, mut origins) = layered(
            &[("default", DEFAULT_TOML), mode_layer],
            config_dir.as_deref(),
            &vars,
        )?;
        // The guide's name, without the MAESTRA_ prefix.
        if let Some(url) = vars.get("DATABASE_URL").filter(|v| !v.is_empty()) {
            raw.database_url = Some(url.clone());
            origins.remove("database_url");
        }
        Self::parse(mode, raw, vars.get("HOME").map(String::as_str))
            .map_err(|e| e.located(&origins))
    }

    fn parse(mode: Mode, raw: Raw, home: Option<&str>) -> Result<Self, ConfigError> {
        let llm = llm::parse(&raw)?;
        let replicas = replicas::parse(&raw)?;
        let database_url = non_empty(raw.database_url)
            .map(parse_database_url)
            .transpose()?;
        if mode == Mode::Cloud && database_url.is_none() {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "required in cloud mode (e.g. postgres://user:password@host:5432/maestra)",
            ));
        }
        let data_dir = match (mode, parse_data_dir(non_empty(raw.data_dir), home)) {
            (_, Ok(dir)) => dir,
            (Mode::Local, Err(e)) => return Err(e),
            // Cloud mode stores nothing on disk; a container may have no $HOME.
            (Mode::Cloud, Err(_)) => PathBuf::from(".8825"),
        };
        let port = match non_empty(raw.port) {
            Some(port) => PortChoice::Fixed(parse_port("MAESTRA_PORT", &port)?),
            None => PortChoice::FirstFree(parse_port_range(
                "MAESTRA_PORT_RANGE",
                &required("MAESTRA_PORT_RANGE", raw.port_range)?,
            )?),
        };
        Ok(Self {
            llm,
            replicas,
            mode,
            host: parse_host(&required("MAESTRA_HOST", raw.host)?)?,
            port,
            data_dir,
            max_message_bytes: parse_positive(
                "MAESTRA_MAX_MESSAGE_BYTES",
                &required("MAESTRA_MAX_MESSAGE_BYTES", raw.max_message_bytes)?,
            )?,
            history_messages: parse_positive(
                "MAESTRA_HISTORY_MESSAGES",
                &required("MAESTRA_HISTORY_MESSAGES", raw.history_messages)?,
            )?,
            cors_origins: parse_origins(raw.cors_origins.as_deref().unwrap_or(""))?,
            cors_extension_ids: parse_extension_ids(
                raw.cors_extension_ids.as_deref().unwrap_or(""),
            )?,
            log: LogSettings {
                format: parse_log_format(raw.log_format.as_deref().unwrap_or("json"))?,
                level: raw.log_level.unwrap_or_else(|| "info".to_owned()),
            },
            database_url,
            api_key: non_empty(raw.api_key).map(parse_api_key).transpose()?,
            rate_limit: Quota {
                requests: parse_count(
                    "MAESTRA_RATE_LIMIT_REQUESTS",
                    &required("MAESTRA_RATE_LIMIT_REQUESTS", raw.rate_limit_requests)?,
                )?,
                window: Duration::from_secs(u64::from(
                    parse_count(
                        "MAESTRA_RATE_LIMIT_WINDOW",
                        &required("MAESTRA_RATE_LIMIT_WINDOW", raw.rate_limit_window)?,
                    )?
                    .get(),
                )),
            },
            auth_failure_limit: parse_count(
                "MAESTRA_AUTH_FAILURE_LIMIT",
                &required("MAESTRA_AUTH_FAILURE_LIMIT", raw.auth_failure_limit)?,
            )?,
            db_max_connections: parse_count(
                "MAESTRA_DB_MAX_CONNECTIONS",
                &required("MAESTRA_DB_MAX_CONNECTIONS", raw.db_max_connections)?,
            )?
            .get(),
            auth_cache_ttl: Duration::from_secs(u64::from(
                parse_count(
                    "MAESTRA_AUTH_CACHE_TTL_SECONDS",
                    &required("MAESTRA_AUTH_CACHE_TTL_SECONDS", raw.auth_cache_ttl_seconds)?,
                )?
                .get(),
            )),
            metrics_token: non_empty(raw.metrics_token).map(SecretString::from),
            body_timeout: Duration::from_secs(u64::from(
                parse_count(
                    "MAESTRA_BODY_TIMEOUT_SECONDS",
                    &required("MAESTRA_BODY_TIMEOUT_SECONDS", raw.body_timeout_seconds)?,
                )?
                .get(),
            )),
            sync: SyncSettings {
                enabled: parse_switch("MAESTRA_SYNC", raw.sync.as_deref().unwrap_or("on"))?,
                interval: Duration::from_secs(u64::from(
                    parse_count(
                        "MAESTRA_SYNC_INTERVAL",
                        &required("MAESTRA_SYNC_INTERVAL", raw.sync_interval)?,
                    )?
                    .get(),
                )),
                batch: match parse_count(
                    "MAESTRA_SYNC_BATCH",
                    &required("MAESTRA_SYNC_BATCH", raw.sync_batch)?,
                )?
                .get()
                {
                    n @ 1..=500 => n as usize,
                    n => {
                        return Err(ConfigError::new(
                            "MAESTRA_SYNC_BATCH",
                            format!("{n} is more than 500 records"),
                        ));
                    }
                },
                quota: Quota {
                    requests: parse_count(
                        "MAESTRA_SYNC_RATE_LIMIT_REQUESTS",
                        &required(
                            "MAESTRA_SYNC_RATE_LIMIT_REQUESTS",
                            raw.sync_rate_limit_requests,
                        )?,
                    )?,
                    window: Duration::from_secs(u64::from(
                        parse_count(
                            "MAESTRA_SYNC_RATE_LIMIT_WINDOW",
                            &required(
                                "MAESTRA_SYNC_RATE_LIMIT_WINDOW",
                                raw.sync_rate_limit_window,
                            )?,
                        )?
                        .get(),
                    )),
                },
            },
            drain: Duration::from_secs(
                raw.drain_seconds
                    .as_deref()
                    .map(|v| {
                        v.trim().parse::<u64>().map_err(|_| {
                            ConfigError::new(
                                "MAESTRA_DRAIN_SECONDS",
                                format!("{v:?} is not a whole number of seconds"),
                            )
                        })
                    })
                    .transpose()?
                    .unwrap_or(0),
            ),
        })
    }
}

/// Which file set each setting that a file set (the rest come from the built-in files or the
/// environment), so that a bad value names the file to fix.
type Origins = HashMap<String, String>;

fn layered(
    layers: &[(&str, &str)],
    config_dir: Option<&Path>,
    vars: &HashMap<String, String>,
) -> Result<(Raw, Origins), ConfigError> {
    let mut builder = Config::builder();
    for (name, text) in layers {
        let source = File::from_str(text, FileFormat::Toml);
        only_known_settings(source.clone(), &format!("the built-in config/{name}.toml"))?;
        builder = builder.add_source(source);
    }
    let mut origins = Origins::new();
    if let Some(dir) = config_dir {
        for (name, _) in layers {
            let path = dir.join(format!("{name}.toml"));
            let source = File::from(path.clone()).required(false);
            if path.exists() {
                let shown = path.display().to_string();
                for key in only_known_settings(source.clone(), &shown)? {
                    origins.insert(key, shown.clone());
                }
            }
            builder = builder.add_source(source);
        }
    }
    // A variable overrides the files: then the variable is what names the value.
    origins.retain(|key, _| {
        vars.get(&format!("MAESTRA_{}", key.to_ascii_uppercase()))
            .is_none_or(|v| v.is_empty())
    });
    let environment = Environment::with_prefix("MAESTRA")
        .prefix_separator("_")
        .ignore_empty(true)
        .source(Some(vars.clone().into_iter().collect()));
    let raw = builder
        .add_source(environment)
        .build()
        .and_then(Config::try_deserialize)
        .map_err(|e| {
            ConfigError::new("MAESTRA_CONFIG_DIR", format!("cannot read settings: {e}"))
        })?;
    Ok((raw, origins))
}

/// A key in a file that no setting reads is a typo (or a setting from another version): an
/// error naming the file and the key, not a value silently ignored. Unknown `MAESTRA_*`
/// variables are left alone: the environment also carries the clients' variables.
/// Returns the settings the file sets.
fn only_known_settings<S>(file: S, shown: &str) -> Result<Vec<String>, ConfigError>
where
    S: config::Source + Send + Sync + 'static,
{
    let config = Config::builder()
        .add_source(file)
        .build()
        .map_err(|e| ConfigError::new(shown, format!("cannot read: {e}")))?;
    let keys = config
        .cache
        .clone()
        .into_table()
        .map_err(|e| ConfigError::new(shown, format!("cannot read: {e}")))?
        .into_keys()
        .collect();
    let mut unknown = Vec::new();
    let read: Result<Raw, _> = serde_ignored::deserialize(config, |path| {
        unknown.push(path.to_string());
    });
    if let Some(key) = unknown.first() {
        return Err(ConfigError::new(
            shown,
            format!(
                "unknown setting `{key}` (the settings are listed in config/default.toml and the README)"
            ),
        ));
    }
    read.map(|_| keys)
        .map_err(|e| ConfigError::new(shown, format!("cannot read: {e}")))
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn required(variable: &str, value: Option<String>) -> Result<String, ConfigError> {
    non_empty(value).ok_or_else(|| ConfigError::new(variable, "must be set"))
}

fn parse_mode(value: Option<&str>) -> Result<Mode, ConfigError> {
    match value.map(str::trim).unwrap_or("local") {
        "local" => Ok(Mode::Local),
        "cloud" => Ok(Mode::Cloud),
        other => Err(ConfigError::new(
            "MAESTRA_MODE",
            format!("unknown mode {other:?} (expected \"local\" or \"cloud\")"),
        )),
    }
}

/// Never echoes the value: it may hold a password.
fn parse_database_url(value: String) -> Result<SecretString, ConfigError> {
    let value = value.trim();
    if !(value.starts_with("postgres://") || value.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            "DATABASE_URL",
            "must be a postgres:// or postgresql:// URL",
        ));
    }
    Ok(SecretString::from(value.to_owned()))
}

/// Never echoes the value: it is a secret.
fn parse_api_key(value: String) -> Result<SecretString, ConfigError> {
    let key = SecretString::from(value.trim().to_owned());
    let text = key.expose_secret();
    if text.len() < MIN_API_KEY_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            "MAESTRA_API_KEY",
            format!("must be at least {MIN_API_KEY_LEN} printable characters without spaces"),
        ));
    }
    Ok(key)
}

fn parse_switch(variable: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::new(
            variable,
            format!("{value:?} is neither on nor off"),
        )),
    }
}

fn parse_count(variable: &str, value: &str) -> Result<NonZeroU32, ConfigError> {
    value.trim().parse::<NonZeroU32>().map_err(|_| {
        ConfigError::new(
            variable,
            format!("{value:?} is not a positive whole number"),
        )
    })
}

fn parse_port(variable: &str, value: &str) -> Result<u16, ConfigError> {
    value.trim().parse::<u16>().map_err(|_| {
        ConfigError::new(
            variable,
            format!("{value:?} is not a port number (0-65535; 0 picks a free port)"),
        )
    })
}

fn parse_port_range(variable: &str, value: &str) -> Result<RangeInclusive<u16>, ConfigError> {
    let invalid = || ConfigError::new(variable, format!("{value:?} is not a range like 8825-8829"));
    let (start, end) = value.split_once('-').ok_or_else(invalid)?;
    let start = start.trim().parse::<u16>().map_err(|_| invalid())?;
    let end = end.trim().parse::<u16>().map_err(|_| invalid())?;
    if start == 0 || start > end {
        return Err(invalid());
    }
    Ok(start..=end)
}

fn parse_host(value: &str) -> Result<IpAddr, ConfigError> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    value.parse().map_err(|_| {
        ConfigError::new(
            "MAESTRA_HOST",
            format!("{value:?} is not an IP address to bind (e.g. 127.0.0.1)"),
        )
    })
}

fn parse_data_dir(value: Option<String>, home: Option<&str>) -> Result<PathBuf, ConfigError> {
    let home = home.filter(|h| !h.is_empty()).map(PathBuf::from);
    let no_home = || ConfigError::new("MAESTRA_DATA_DIR", "not set, and $HOME is not set either");
    match value {
        None => Ok(home.ok_or_else(no_home)?.join(".8825")),
        Some(dir) if dir == "~" => home.ok_or_else(no_home),
        Some(dir) => match dir.strip_prefix("~/") {
            Some(rest) => Ok(home.ok_or_else(no_home)?.join(rest)),
            None => Ok(PathBuf::from(dir)),
        },
    }
}

fn parse_positive(variable: &str, value: &str) -> Result<usize, ConfigError> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ConfigError::new(
            variable,
            format!("{value:?} is not a positive whole number"),
        )),
    }
}

fn parse_origins(value: &str) -> Result<Vec<String>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|origin| {
            let valid = origin.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty() && !rest.is_empty() && !rest.contains('/')
            });
            if valid {
                Ok(origin.trim_end_matches('/').to_owned())
            } else {
                Err(ConfigError::new(
                    "MAESTRA_CORS_ORIGINS",
                    format!("{origin:?} is not an origin like https://example.com"),
                ))
            }
        })
        .collect()
}

/// Extension ids as the browsers show them: Chrome's 32 letters, Firefox's and Safari's UUIDs.
fn parse_extension_ids(value: &str) -> Result<Vec<String>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(|id| {
            if id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@{}".contains(c))
            {
                Ok(id.to_owned())
            } else {
                Err(ConfigError::new(
                    "MAESTRA_CORS_EXTENSION_IDS",
                    format!(
                        "{id:?} is not an extension id (e.g. abcdefghijklmnopabcdefghijklmnop)"
                    ),
                ))
            }
        })
        .collect()
}

fn parse_log_format(value: &str) -> Result<LogFormat, ConfigError> {
    match value.trim() {
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        other => Err(ConfigError::new(
            "MAESTRA_LOG_FORMAT",
            format!("unknown format {other:?} (expected \"json\" or \"pretty\")"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings from exactly these variables (plus a HOME, unless given).
    pub(super) fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        map.entry("HOME".to_owned())
            .or_insert_with(|| "/home/ana".to_owned());
        Settings::load_from(map)
    }

    #[test]
    fn with_no_configuration_it_is_local_on_loopback_with_the_guides_ports_and_folder() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.mode, Mode::Local);
        assert_eq!(settings.host, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(settings.port, PortChoice::FirstFree(8825..=8829));
        assert_eq!(settings.data_dir, PathBuf::from("/home/ana/.8825"));
        assert_eq!(settings.max_message_bytes, 32 * 1024);
        assert_eq!(settings.log.format, LogFormat::Json);
    }

    #[test]
    fn environment_variables_override_the_files() {
        let settings = load(&[
            ("MAESTRA_PORT", "9000"),
            ("MAESTRA_HOST", "0.0.0.0"),
            ("MAESTRA_DATA_DIR", "~/elsewhere"),
            ("MAESTRA_MAX_MESSAGE_BYTES", "100"),
            (
                "MAESTRA_CORS_ORIGINS",
                "https://a.example, http://localhost:3000",
            ),
        ])
        .unwrap();
        assert_eq!(settings.port, PortChoice::Fixed(9000));
        assert_eq!(settings.host, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(settings.data_dir, PathBuf::from("/home/ana/elsewhere"));
        assert_eq!(settings.max_message_bytes, 100);
        assert_eq!(
            settings.cors_origins,
            ["https://a.example", "http://localhost:3000"]
        );
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let settings = load(&[("MAESTRA_PORT", "")]).unwrap();
        assert_eq!(settings.port, PortChoice::FirstFree(8825..=8829));
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases = [
            ("MAESTRA_MODE", "hybrid"),
            ("MAESTRA_PORT", "70000"),
            ("MAESTRA_PORT", "eighty"),
            ("MAESTRA_HOST", "my laptop"),
            ("MAESTRA_MAX_MESSAGE_BYTES", "0"),
            ("MAESTRA_HISTORY_MESSAGES", "-3"),
            ("MAESTRA_CORS_ORIGINS", "not an origin"),
            ("MAESTRA_CORS_EXTENSION_IDS", "chrome-extension://abc"),
            ("MAESTRA_LOG_FORMAT", "xml"),
            ("MAESTRA_PORT_RANGE", "8829-8825"),
            ("MAESTRA_RATE_LIMIT_REQUESTS", "0"),
            ("MAESTRA_RATE_LIMIT_WINDOW", "a minute"),
            ("MAESTRA_API_KEY", "short"),
            ("DATABASE_URL", "mysql://root@localhost/db"),
        ];
        for (variable, value) in cases {
            let err = load(&[(variable, value)]).unwrap_err();
            assert_eq!(err.variable, variable, "{variable}={value}: {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn cloud_mode_listens_on_all_interfaces_on_8000_and_needs_a_database() {
        let err = load(&[("MAESTRA_MODE", "cloud")]).unwrap_err();
        assert_eq!(err.variable, "DATABASE_URL");
        let settings = load(&[
            ("MAESTRA_MODE", "cloud"),
            ("DATABASE_URL", "postgres://maestra:hunter2@db/maestra"),
            ("MAESTRA_API_KEY", "sk_your_key_here"),
            ("MAESTRA_RATE_LIMIT_REQUESTS", "5"),
            ("MAESTRA_RATE_LIMIT_WINDOW", "10"),
        ])
        .unwrap();
        assert_eq!(settings.mode, Mode::Cloud);
        assert_eq!(settings.host, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(settings.port, PortChoice::Fixed(8000));
        assert_eq!(settings.rate_limit.requests.get(), 5);
        assert_eq!(settings.rate_limit.window, Duration::from_secs(10));
        assert_eq!(
            settings.api_key.as_ref().unwrap().expose_secret(),
            "sk_your_key_here"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output_or_errors() {
        let settings = load(&[
            ("MAESTRA_MODE", "cloud"),
            ("DATABASE_URL", "postgres://maestra:hunter2@db/maestra"),
            ("MAESTRA_API_KEY", "sk_very_secret_value"),
        ])
        .unwrap();
        let debug = format!("{settings:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("sk_very_secret_value"),
            "{debug}"
        );
        let err = load(&[("MAESTRA_API_KEY", "tiny secret")]).unwrap_err();
        assert!(!err.to_string().contains("tiny secret"));
        let err = load(&[("DATABASE_URL", "mysql://root:hunter2@db")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn a_missing_config_dir_is_an_error() {
        let err = load(&[("MAESTRA_CONFIG_DIR", "/nonexistent/maestra")]).unwrap_err();
        assert_eq!(err.variable, "MAESTRA_CONFIG_DIR");
    }

    #[test]
    fn a_typo_in_a_config_file_is_an_error_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("local.toml");
        std::fs::write(&file, "max_message_bytse = 10\n").unwrap();
        let err = load(&[("MAESTRA_CONFIG_DIR", dir.path().to_str().unwrap())]).unwrap_err();
        assert_eq!(err.variable, file.display().to_string());
        assert!(err.problem.contains("`max_message_bytse`"), "{err}");

        std::fs::write(
            dir.path().join("default.toml"),
            "llm_prices.\"m\" = { input = 1, ouptut = 2 }\n",
        )
        .unwrap();
        std::fs::remove_file(&file).unwrap();
        let err = load(&[("MAESTRA_CONFIG_DIR", dir.path().to_str().unwrap())]).unwrap_err();
        assert!(err.problem.contains("ouptut"), "{err}");
    }

    #[test]
    fn unknown_maestra_variables_are_left_to_the_clients() {
        let settings = load(&[
            ("MAESTRA_LOCAL_URL", "http://127.0.0.1:8825"),
            ("MAESTRA_USER_ID", "ana"),
            ("MAESTRA_SOMETHING_ELSE", "x"),
        ]);
        assert!(settings.is_ok());
    }

    #[test]
    fn a_bad_value_in_a_file_names_the_file_and_one_in_a_variable_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("local.toml");
        std::fs::write(&file, "max_message_bytes = 0\n").unwrap();
        let config_dir = ("MAESTRA_CONFIG_DIR", dir.path().to_str().unwrap());
        let err = load(&[config_dir]).unwrap_err();
        assert_eq!(
            err.variable,
            format!("max_message_bytes in {}", file.display())
        );
        assert!(
            !err.to_string().contains("MAESTRA_MAX_MESSAGE_BYTES"),
            "{err}"
        );
        // The variable overrides the file: then the variable is what to fix.
        let err = load(&[config_dir, ("MAESTRA_MAX_MESSAGE_BYTES", "none")]).unwrap_err();
        assert_eq!(err.variable, "MAESTRA_MAX_MESSAGE_BYTES");
        // A good variable over the bad file is fine.
        assert!(load(&[config_dir, ("MAESTRA_MAX_MESSAGE_BYTES", "10")]).is_ok());

        std::fs::write(&file, "mode = \"hybrid\"\n").unwrap();
        std::fs::rename(&file, dir.path().join("default.toml")).unwrap();
        let err = load(&[config_dir]).unwrap_err();
        assert!(err.variable.starts_with("mode in "), "{err}");
    }

    #[test]
    fn a_config_dir_overrides_the_built_in_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("local.toml"), "history_messages = 7\n").unwrap();
        let settings = load(&[("MAESTRA_CONFIG_DIR", dir.path().to_str().unwrap())]).unwrap();
        assert_eq!(settings.history_messages, 7);
    }
}
