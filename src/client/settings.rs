//! What a client (`ask`, `health`, `mcp`) needs to know: where the local and cloud backends
//! are, whether falling back is allowed, the key for the cloud. Read from the environment only
//! (clients have no config files); every bad value is named by its variable, as in `config.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};

use crate::config::ConfigError;

/// The guide's first port: the local server's when no port file says otherwise.
const DEFAULT_LOCAL_PORT: u16 = 8825;

#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `MAESTRA_LOCAL_URL`, else the loopback port the local server wrote to its port file.
    pub local_url: Url,
    /// `MAESTRA_CLOUD_URL`: shown by `health`; asked only when fallback is enabled.
    pub cloud_url: Option<Url>,
    /// `MAESTRA_API_KEY`: sent to the cloud only. `Debug` prints `[REDACTED]`.
    pub api_key: Option<SecretString>,
    /// `MAESTRA_FALLBACK_ENABLED`: off unless set, so nothing leaves the machine by surprise.
    pub fallback_enabled: bool,
    /// `MAESTRA_DATA_DIR` (`~/` expanded), else `~/.8825`; none when neither can be known.
    data_dir: Option<PathBuf>,
    /// `MAESTRA_USER_ID`, else the OS user name (`$USER`, `$LOGNAME`, else the account's
    /// name from the system).
    pub default_user: Option<String>,
}

impl ClientSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut settings = Self::from_vars(&std::env::vars().collect())?;
        // Containers, launchd and systemd often leave $USER unset; the account still has a name.
        if settings.default_user.is_none() {
            settings.default_user = whoami::fallible::username()
                .ok()
                .filter(|name| !name.trim().is_empty());
        }
        Ok(settings)
    }

    /// Settings from the given variables (tests pass their own).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |name: &str| vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let data_dir = data_dir(get("MAESTRA_DATA_DIR"), get("HOME"));
        let local_url = match get("MAESTRA_LOCAL_URL") {
            Some(url) => parse_url("MAESTRA_LOCAL_URL", url)?,
            None => default_local_url(data_dir.as_deref()),
        };
        let cloud_url = get("MAESTRA_CLOUD_URL")
            .map(|url| parse_url("MAESTRA_CLOUD_URL", url))
            .transpose()?;
        let fallback_enabled = match get("MAESTRA_FALLBACK_ENABLED") {
            Some(value) => parse_bool("MAESTRA_FALLBACK_ENABLED", value)?,
            None => false,
        };
        if fallback_enabled && cloud_url.is_none() {
            return Err(named(
                "MAESTRA_CLOUD_URL",
                "required when MAESTRA_FALLBACK_ENABLED is true (e.g. https://maestra.replit.dev)",
            ));
        }
        let api_key = get("MAESTRA_API_KEY")
            .map(|key| parse_api_key(key.to_owned()))
            .transpose()?;
        let default_user = ["MAESTRA_USER_ID", "USER", "LOGNAME"]
            .into_iter()
            .find_map(get)
            .map(str::to_owned);
        Ok(Self {
            local_url,
            cloud_url,
            api_key,
            fallback_enabled,
            data_dir,
            default_user,
        })
    }

    /// The data folder, or the error that says how to name one.
    pub fn data_dir(&self) -> Result<&Path, ConfigError> {
        self.data_dir
            .as_deref()
            .ok_or_else(|| named("MAESTRA_DATA_DIR", "not set, and $HOME is not set either"))
    }

    /// The user a message is sent as when the caller names none.
    pub fn user_or_default(&self, user: Option<&str>) -> Result<String, ConfigError> {
        user.map(str::to_owned)
            .or_else(|| self.default_user.clone())
            .ok_or_else(|| {
                named(
                    "MAESTRA_USER_ID",
                    "not set, and the OS user name ($USER) is unknown; pass --user",
                )
            })
    }
}

fn named(variable: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable: variable.to_owned(),
        problem: problem.into(),
    }
}

/// The same rule as the server's `MAESTRA_DATA_DIR`: `~` and `~/…` are under `$HOME`.
fn data_dir(value: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
    let home = home.map(PathBuf::from);
    match value {
        None => home.map(|h| h.join(".8825")),
        Some("~") => home,
        Some(dir) => match dir.strip_prefix("~/") {
            Some(rest) => home.map(|h| h.join(rest)),
            None => Some(PathBuf::from(dir)),
        },
    }
}

/// Where a local server announced itself, else the guide's default port.
fn default_local_url(data_dir: Option<&Path>) -> Url {
    let port = data_dir
        .and_then(|dir| std::fs::read_to_string(dir.join("maestra.port")).ok())
        .and_then(|text| text.trim().parse::<u16>().ok())
        .filter(|port| *port != 0)
        .unwrap_or(DEFAULT_LOCAL_PORT);
    loopback_url(port)
}

fn loopback_url(port: u16) -> Url {
    Url::parse(&format!("http://127.0.0.1:{port}/"))
        .expect("a loopback address with a numeric port is a valid URL")
}

/// An http(s) base URL. The value is not echoed: it may carry credentials.
fn parse_url(variable: &str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value).map_err(|e| {
        named(
            variable,
            format!("not a URL ({e}); expected e.g. http://127.0.0.1:8825"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(named(
            variable,
            "must be an http:// or https:// URL with a host",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(named(variable, "must not have a query or a fragment"));
    }
    Ok(url)
}

fn parse_bool(variable: &str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(named(
            variable,
            format!("{value:?} is not a boolean (expected true/false, 1/0 or yes/no)"),
        )),
    }
}

/// Never echoes the value: it is a secret.
fn parse_api_key(value: String) -> Result<SecretString, ConfigError> {
    let key = SecretString::from(value);
    if !key.expose_secret().bytes().all(|b| b.is_ascii_graphic()) {
        return Err(named(
            "MAESTRA_API_KEY",
            "must be printable characters without spaces",
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<ClientSettings, ConfigError> {
        let mut map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        map.entry("HOME".to_owned())
            .or_insert_with(|| "/nonexistent/home/ana".to_owned());
        ClientSettings::from_vars(&map)
    }

    #[test]
    fn with_nothing_set_it_asks_the_guides_local_port_and_never_the_cloud() {
        let settings = load(&[("USER", "ana")]).unwrap();
        assert_eq!(settings.local_url.as_str(), "http://127.0.0.1:8825/");
        assert!(settings.cloud_url.is_none());
        assert!(!settings.fallback_enabled);
        assert_eq!(settings.default_user.as_deref(), Some("ana"));
        assert_eq!(
            settings.data_dir().unwrap(),
            Path::new("/nonexistent/home/ana/.8825")
        );
    }

    #[test]
    fn the_local_port_comes_from_the_servers_port_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("maestra.port"), "8827\n").unwrap();
        let settings = load(&[("MAESTRA_DATA_DIR", dir.path().to_str().unwrap())]).unwrap();
        assert_eq!(settings.local_url.as_str(), "http://127.0.0.1:8827/");
    }

    #[test]
    fn the_guides_mcp_environment_is_accepted() {
        let settings = load(&[
            ("MAESTRA_LOCAL_URL", "http://127.0.0.1:8825"),
            ("MAESTRA_CLOUD_URL", "https://maestra.replit.dev"),
            ("MAESTRA_FALLBACK_ENABLED", "true"),
            ("MAESTRA_USER_ID", "justinharmon"),
        ])
        .unwrap();
        assert!(settings.fallback_enabled);
        assert_eq!(
            settings.cloud_url.unwrap().as_str(),
            "https://maestra.replit.dev/"
        );
        assert_eq!(settings.default_user.as_deref(), Some("justinharmon"));
    }

    #[test]
    fn fallback_accepts_the_usual_spellings_of_yes_and_no() {
        let cloud = ("MAESTRA_CLOUD_URL", "https://cloud.example");
        for yes in ["true", "TRUE", "1", "yes", "Yes"] {
            assert!(
                load(&[("MAESTRA_FALLBACK_ENABLED", yes), cloud])
                    .unwrap()
                    .fallback_enabled
            );
        }
        for no in ["false", "0", "no", "NO", ""] {
            assert!(
                !load(&[("MAESTRA_FALLBACK_ENABLED", no), cloud])
                    .unwrap()
                    .fallback_enabled
            );
        }
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[&[(&str, &str)]] = &[
            &[("MAESTRA_FALLBACK_ENABLED", "maybe")],
            &[("MAESTRA_LOCAL_URL", "localhost:8825")],
            &[("MAESTRA_LOCAL_URL", "ftp://127.0.0.1")],
            &[("MAESTRA_CLOUD_URL", "not a url")],
            &[("MAESTRA_CLOUD_URL", "https://c.example/?x=1")],
            &[("MAESTRA_API_KEY", "sk with spaces")],
        ];
        for vars in cases {
            let (variable, value) = vars[0];
            let err = load(vars).unwrap_err();
            assert_eq!(err.variable, variable, "{variable}={value}: {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn fallback_without_a_cloud_url_is_an_error_naming_the_cloud_url() {
        let err = load(&[("MAESTRA_FALLBACK_ENABLED", "yes")]).unwrap_err();
        assert_eq!(err.variable, "MAESTRA_CLOUD_URL");
    }

    #[test]
    fn the_api_key_never_shows_in_errors_or_debug_output() {
        let settings = load(&[("MAESTRA_API_KEY", "sk_very_secret_value")]).unwrap();
        assert!(!format!("{settings:?}").contains("sk_very_secret_value"));
        let err = load(&[("MAESTRA_API_KEY", "sk secret")]).unwrap_err();
        assert!(!err.to_string().contains("sk secret"));
        let err = load(&[("MAESTRA_CLOUD_URL", "https://user:hunter2@/")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
