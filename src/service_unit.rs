//! The auto-start service's file as text: a launchd property list (macOS) or a systemd user unit
//! (Linux), rendered from a small `ServiceSpec`. Pure functions; writing the file and telling
//! launchd or systemd about it is `commands::install`'s job.

use std::path::{Path, PathBuf};

/// The launchd job's label (the guide's `launchctl stop com.8825.maestra`).
pub const LAUNCHD_LABEL: &str = "com.8825.maestra";
/// The systemd user unit's name (`journalctl --user -u maestra`).
pub const SYSTEMD_UNIT: &str = "maestra.service";
/// How long the service manager waits after SIGTERM before SIGKILL: maestra gives in-flight
/// requests 30 s to finish, plus a margin.
const STOP_TIMEOUT_SECONDS: u32 = 35;

/// Settings copied from the installing shell into the service file: they decide where and how
/// the local server runs, and none is a secret. Anything else (MAESTRA_API_KEY,
/// MAESTRA_LLM_API_KEY, …) is never written into the file.
pub const CARRIED_VARIABLES: &[&str] = &[
    "MAESTRA_CONFIG_DIR",
    "MAESTRA_CORS_EXTENSION_IDS",
    "MAESTRA_CORS_ORIGINS",
    "MAESTRA_DATA_DIR",
    "MAESTRA_HISTORY_MESSAGES",
    "MAESTRA_HOST",
    "MAESTRA_LLM_BASE_URL",
    "MAESTRA_LLM_MODEL",
    "MAESTRA_LOG_FORMAT",
    "MAESTRA_LOG_LEVEL",
    "MAESTRA_MAX_MESSAGE_BYTES",
    "MAESTRA_PORT",
    "MAESTRA_PORT_RANGE",
    "MAESTRA_SYNC",
    "MAESTRA_SYNC_INTERVAL",
];

/// Variables whose value is a path the server reads relative to its working directory, which
/// is `/` under launchd: a relative one is made absolute at install time.
const PATH_VARIABLES: &[&str] = &["MAESTRA_CONFIG_DIR", "MAESTRA_DATA_DIR"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    /// launchd LaunchAgent (~/Library/LaunchAgents/com.8825.maestra.plist)
    Macos,
    /// systemd user unit (~/.config/systemd/user/maestra.service)
    Linux,
}

impl Platform {
    /// The platform this binary was built for, if `install` supports it.
    pub fn current() -> Option<Self> {
        if cfg!(target_os = "macos") {
            Some(Self::Macos)
        } else if cfg!(target_os = "linux") {
            Some(Self::Linux)
        } else {
            None
        }
    }

    /// Where the service file goes. systemd reads user units from `$XDG_CONFIG_HOME` when it is
    /// set (and absolute), else from `~/.config`.
    pub fn service_file(self, home: &Path, xdg_config_home: Option<&Path>) -> PathBuf {
        match self {
            Self::Macos => home
                .join("Library/LaunchAgents")
                .join(format!("{LAUNCHD_LABEL}.plist")),
            Self::Linux => xdg_config_home
                .filter(|dir| dir.is_absolute())
                .map_or_else(|| home.join(".config"), Path::to_path_buf)
                .join("systemd/user")
                .join(SYSTEMD_UNIT),
        }
    }
}

/// The guide's log files under launchd: (stdout, stderr).
pub fn launchd_log_files(home: &Path) -> (PathBuf, PathBuf) {
    let logs = home.join("Library/Logs");
    (
        logs.join("maestra_backend.log"),
        logs.join("maestra_backend_error.log"),
    )
}

/// What the service file says: which binary runs, for whom, with which settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Absolute path of the `maestra` binary the service runs (`<binary> serve`).
    pub binary: PathBuf,
    /// The user's home folder: the macOS log files live under it.
    pub home: PathBuf,
    /// Variables set for the service, in this order.
    pub environment: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{0} must be an absolute path")]
    NotAbsolute(String),
    #[error("{0} is not valid UTF-8, which a service file cannot hold")]
    NotUtf8(String),
    #[error("{0} holds a control character (a line break?), which a service file cannot hold")]
    ControlCharacter(String),
    #[error("systemd refuses to run a program whose path holds a quote or a backslash: {0}")]
    UnsafeForSystemd(String),
}

/// The variables to write into the service file, from the installing process's environment:
/// `MAESTRA_MODE=local` (the auto-started server is the local one, whatever the shell says),
/// then each of `CARRIED_VARIABLES` that is set, relative paths made absolute against `cwd`.
pub fn service_environment(
    vars: impl IntoIterator<Item = (String, String)>,
    cwd: &Path,
) -> Vec<(String, String)> {
    let mut carried: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(name, value)| {
            CARRIED_VARIABLES.contains(&name.as_str()) && !value.trim().is_empty()
        })
        .map(|(name, value)| {
            let relative = !value.starts_with('/') && !value.starts_with('~');
            if PATH_VARIABLES.contains(&name.as_str()) && relative {
                let absolute = cwd.join(&value).to_string_lossy().into_owned();
                (name, absolute)
            } else {
                (name, value)
            }
        })
        .collect();
    carried.sort();
    let mut environment = vec![("MAESTRA_MODE".to_owned(), "local".to_owned())];
    environment.extend(carried);
    environment
}

/// Set variables that look like secrets and are therefore left out of the service file.
pub fn secrets_left_out(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let mut names: Vec<String> = vars
        .into_iter()
        .filter(|(name, value)| {
            name.starts_with("MAESTRA_")
                && !value.is_empty()
                && ["KEY", "TOKEN", "SECRET", "PASSWORD"]
                    .iter()
                    .any(|word| name.contains(word))
        })
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names
}

/// The LaunchAgent property list (`~/Library/LaunchAgents/com.8825.maestra.plist`).
pub fn launchd_plist(spec: &ServiceSpec) -> Result<String, UnitError> {
    let binary = absolute_text(&spec.binary)?;
    let (out_log, err_log) = launchd_log_files(&spec.home);
    let (out_log, err_log) = (absolute_text(&out_log)?, absolute_text(&err_log)?);

    let mut text = String::from(concat!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
        "<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" ",
        "\"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n",
        "<plist version=\"1.0\">\n<dict>\n",
    ));
    let key = |text: &mut String, key: &str| text.push_str(&format!("\t<key>{key}</key>\n"));
    let string = |value: &str| format!("<string>{}</string>", xml_escape(value));

    key(&mut text, "Label");
    text.push_str(&format!("\t{}\n", string(LAUNCHD_LABEL)));
    key(&mut text, "ProgramArguments");
    text.push_str(&format!(
        "\t<array>\n\t\t{}\n\t\t{}\n\t</array>\n",
        string(binary),
        string("serve")
    ));
    key(&mut text, "EnvironmentVariables");
    text.push_str("\t<dict>\n");
    for (name, value) in &spec.environment {
        check_value(name, value)?;
        text.push_str(&format!(
            "\t\t<key>{}</key>\n\t\t{}\n",
            xml_escape(name),
            string(value)
        ));
    }
    text.push_str("\t</dict>\n");
    // Start at login, and start again whenever it stops (the guide's `launchctl stop` restarts).
    key(&mut text, "RunAtLoad");
    text.push_str("\t<true/>\n");
    key(&mut text, "KeepAlive");
    text.push_str("\t<true/>\n");
    key(&mut text, "ExitTimeOut");
    text.push_str(&format!("\t<integer>{STOP_TIMEOUT_SECONDS}</integer>\n"));
    key(&mut text, "StandardOutPath");
    text.push_str(&format!("\t{}\n", string(out_log)));
    key(&mut text, "StandardErrorPath");
    text.push_str(&format!("\t{}\n", string(err_log)));
    text.push_str("</dict>\n</plist>\n");
    Ok(text)
}

/// The systemd user unit (`~/.config/systemd/user/maestra.service`). Its output goes to the
/// journal: `journalctl --user -u maestra`.
pub fn systemd_unit(spec: &ServiceSpec) -> Result<String, UnitError> {
    let binary = absolute_text(&spec.binary)?;
    // systemd's own rule for executable paths ("contains special characters").
    if binary.contains(['"', '\'', '\\']) {
        return Err(UnitError::UnsafeForSystemd(binary.to_owned()));
    }
    let mut text = String::from(concat!(
        "# Written by `maestra install`; `maestra uninstall` removes it.\n",
        "[Unit]\n",
        "Description=Maestra Backend (local mode)\n",
        "\n",
        "[Service]\n",
        "Type=exec\n",
    ));
    // The executable word is not searched for `$VARIABLES` (its arguments would be): only `%`
    // specifiers need escaping there, which `systemd_quote` does.
    text.push_str(&format!("ExecStart={} serve\n", systemd_quote(binary)));
    for (name, value) in &spec.environment {
        check_value(name, value)?;
        text.push_str(&format!(
            "Environment={}\n",
            systemd_quote(&format!("{name}={value}"))
        ));
    }
    text.push_str(&format!(
        concat!(
            "Restart=on-failure\n",
            "RestartSec=2\n",
            "# SIGTERM (the default) lets in-flight requests finish; they get 30 s.\n",
            "TimeoutStopSec={}\n",
            "\n",
            "[Install]\n",
            "WantedBy=default.target\n",
        ),
        STOP_TIMEOUT_SECONDS
    ));
    Ok(text)
}

fn absolute_text(path: &Path) -> Result<&str, UnitError> {
    let text = path
        .to_str()
        .ok_or_else(|| UnitError::NotUtf8(path.to_string_lossy().into_owned()))?;
    if !path.is_absolute() {
        return Err(UnitError::NotAbsolute(text.to_owned()));
    }
    check_value(text, text)?;
    Ok(text)
}

fn check_value(name: &str, value: &str) -> Result<(), UnitError> {
    if name.chars().chain(value.chars()).any(char::is_control) {
        return Err(UnitError::ControlCharacter(name.to_owned()));
    }
    Ok(())
}

fn xml_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// One double-quoted systemd word: backslashes and quotes C-escaped, `%` doubled.
fn systemd_quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '\\' => quoted.push_str("\\\\"),
            '"' => quoted.push_str("\\\""),
            '%' => quoted.push_str("%%"),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(binary: &str) -> ServiceSpec {
        ServiceSpec {
            binary: PathBuf::from(binary),
            home: PathBuf::from("/Users/ana"),
            environment: vec![("MAESTRA_MODE".to_owned(), "local".to_owned())],
        }
    }

    #[test]
    fn xml_special_characters_in_a_path_are_escaped() {
        let plist = launchd_plist(&spec("/Apps/R&D <x> \"q\" 'a'/maestra")).unwrap();
        assert!(
            plist.contains(
                "<string>/Apps/R&amp;D &lt;x&gt; &quot;q&quot; &apos;a&apos;/maestra</string>"
            ),
            "{plist}"
        );
    }

    #[test]
    fn systemd_words_are_quoted_with_percent_doubled() {
        let mut spec = spec("/opt/a b/100% $HOME/maestra");
        spec.environment
            .push(("MAESTRA_DATA_DIR".to_owned(), "/d/\"q\" \\ 5%".to_owned()));
        let unit = systemd_unit(&spec).unwrap();
        assert!(
            unit.contains(r#"ExecStart="/opt/a b/100%% $HOME/maestra" serve"#),
            "{unit}"
        );
        assert!(
            unit.contains(r#"Environment="MAESTRA_DATA_DIR=/d/\"q\" \\ 5%%""#),
            "{unit}"
        );
    }

    #[test]
    fn a_binary_path_systemd_would_refuse_is_refused_here() {
        for path in [
            "/opt/it's/maestra",
            "/opt/\"q\"/maestra",
            "/opt/a\\b/maestra",
        ] {
            assert_eq!(
                systemd_unit(&spec(path)).unwrap_err(),
                UnitError::UnsafeForSystemd(path.to_owned())
            );
        }
    }

    #[test]
    fn a_relative_binary_path_is_refused() {
        let err = systemd_unit(&spec("target/release/maestra")).unwrap_err();
        assert_eq!(
            err,
            UnitError::NotAbsolute("target/release/maestra".to_owned())
        );
        assert!(launchd_plist(&spec("maestra")).is_err());
    }

    #[test]
    fn a_line_break_in_a_value_is_refused_not_written() {
        let mut spec = spec("/usr/local/bin/maestra");
        spec.environment.push((
            "MAESTRA_DATA_DIR".to_owned(),
            "/tmp/a\nExecStartPre=/bin/evil".to_owned(),
        ));
        assert_eq!(
            systemd_unit(&spec).unwrap_err(),
            UnitError::ControlCharacter("MAESTRA_DATA_DIR".to_owned())
        );
        assert!(launchd_plist(&spec).is_err());
    }

    #[test]
    fn only_non_secret_settings_are_carried_and_the_mode_is_always_local() {
        let vars = [
            ("MAESTRA_PORT", "8830"),
            ("MAESTRA_DATA_DIR", "data"),
            ("MAESTRA_CONFIG_DIR", "~/maestra-config"),
            ("MAESTRA_MODE", "cloud"),
            ("MAESTRA_API_KEY", "sk_secret"),
            ("MAESTRA_LLM_API_KEY", "sk_other"),
            ("MAESTRA_LOG_LEVEL", ""),
            ("DATABASE_URL", "postgres://u:p@h/db"),
            ("PATH", "/usr/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let environment = service_environment(vars.clone(), Path::new("/home/ana/src"));
        let expected = [
            ("MAESTRA_MODE", "local"),
            ("MAESTRA_CONFIG_DIR", "~/maestra-config"),
            ("MAESTRA_DATA_DIR", "/home/ana/src/data"),
            ("MAESTRA_PORT", "8830"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(environment, expected);
        assert_eq!(
            secrets_left_out(vars),
            ["MAESTRA_API_KEY", "MAESTRA_LLM_API_KEY"]
        );
    }

    #[test]
    fn user_units_follow_xdg_config_home_when_it_is_absolute() {
        let home = Path::new("/home/ana");
        assert_eq!(
            Platform::Linux.service_file(home, None),
            Path::new("/home/ana/.config/systemd/user/maestra.service")
        );
        assert_eq!(
            Platform::Linux.service_file(home, Some(Path::new("/cfg"))),
            Path::new("/cfg/systemd/user/maestra.service")
        );
        assert_eq!(
            Platform::Linux.service_file(home, Some(Path::new("relative"))),
            Path::new("/home/ana/.config/systemd/user/maestra.service")
        );
        assert_eq!(
            Platform::Macos.service_file(home, Some(Path::new("/cfg"))),
            Path::new("/home/ana/Library/LaunchAgents/com.8825.maestra.plist")
        );
    }
}
