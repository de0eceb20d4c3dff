//! `maestra install` / `maestra uninstall`: write or remove the auto-start service file and tell
//! launchd (macOS) or systemd (Linux) about it. The file's text comes from `service_unit`; this
//! module does the side effects, as a list of steps that `--dry-run` prints instead of running.
//!
//! Order matters: the first step checks that the service manager answers before anything is
//! written, and a failure after the file is written puts the file back as it was.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::service_unit::{
    self, LAUNCHD_LABEL, Platform, SYSTEMD_UNIT, ServiceSpec, launchd_log_files,
};

#[derive(Debug, clap::Args)]
pub struct InstallOpts {
    /// Print the file that would be written and the commands that would run; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Render for this platform instead of the one running (only with --dry-run).
    #[arg(long, value_enum, requires = "dry_run")]
    pub platform: Option<Platform>,
    /// The maestra binary the service runs, as an absolute path [default: this binary].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UninstallOpts {
    /// Print what would be removed and the commands that would run; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Show the steps for this platform instead of the one running (only with --dry-run).
    #[arg(long, value_enum, requires = "dry_run")]
    pub platform: Option<Platform>,
}

pub fn install(opts: &InstallOpts) -> anyhow::Result<()> {
    let platform = chosen_platform(opts.platform)?;
    let host = Host::from_process()?;
    let spec = ServiceSpec {
        binary: binary_path(opts.binary.as_deref(), opts.dry_run)?,
        home: host.home.clone(),
        environment: service_unit::service_environment(host.vars.clone(), &host.cwd),
    };
    let file = platform.service_file(&host.home, host.xdg_config_home.as_deref());
    let steps = install_steps(platform, &spec, &file)?;
    for name in service_unit::secrets_left_out(host.vars) {
        eprintln!(
            "maestra: note: {name} is set but is not written into the service file (secrets stay out of it)"
        );
    }
    if opts.dry_run {
        print_dry_run(&steps);
        return Ok(());
    }
    execute(&steps)?;
    match platform {
        Platform::Macos => {
            let (out_log, err_log) = launchd_log_files(&host.home);
            println!(
                "maestra starts at login now, and again whenever it stops. Logs: {} and {}",
                out_log.display(),
                err_log.display()
            );
        }
        Platform::Linux => println!(
            "maestra starts at login now, and again if it fails. Logs: journalctl --user -u maestra"
        ),
    }
    Ok(())
}

pub fn uninstall(opts: &UninstallOpts) -> anyhow::Result<()> {
    let platform = chosen_platform(opts.platform)?;
    let host = Host::from_process()?;
    let file = platform.service_file(&host.home, host.xdg_config_home.as_deref());
    if !file.exists() {
        println!(
            "maestra is not installed ({} does not exist): nothing to do.",
            file.display()
        );
        return Ok(());
    }
    let steps = uninstall_steps(platform, &file)?;
    if opts.dry_run {
        print_dry_run(&steps);
        return Ok(());
    }
    execute(&steps)?;
    println!("maestra no longer starts at login. Conversations and settings are kept.");
    Ok(())
}

/// What the running process knows about its user.
struct Host {
    home: PathBuf,
    xdg_config_home: Option<PathBuf>,
    cwd: PathBuf,
    /// The environment's UTF-8 variables (others cannot go into a service file anyway).
    vars: Vec<(String, String)>,
}

impl Host {
    fn from_process() -> anyhow::Result<Self> {
        let home = std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(PathBuf::from)
            .context("HOME is not set: cannot tell where the service file goes")?;
        Ok(Self {
            home,
            xdg_config_home: std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from),
            cwd: std::env::current_dir().context("cannot read the current folder")?,
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        })
    }
}

fn chosen_platform(requested: Option<Platform>) -> anyhow::Result<Platform> {
    match requested.or_else(Platform::current) {
        Some(platform) => Ok(platform),
        None => bail!(
            "the auto-start service exists for macOS (launchd) and Linux (systemd) only; run `maestra serve` yourself"
        ),
    }
}

fn binary_path(given: Option<&Path>, dry_run: bool) -> anyhow::Result<PathBuf> {
    let Some(path) = given else {
        let exe = std::env::current_exe().context("cannot find this program's own path")?;
        return exe
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", exe.display()));
    };
    if !path.is_absolute() {
        bail!("--binary {}: must be an absolute path", path.display());
    }
    match path.canonicalize() {
        Ok(resolved) if resolved.is_file() => Ok(resolved),
        Ok(_) => bail!("--binary {}: not a file", path.display()),
        // A dry run may show a binary that is yet to be copied there.
        Err(_) if dry_run => Ok(path.to_path_buf()),
        Err(e) => bail!("--binary {}: {e}", path.display()),
    }
}

/// An external command.
struct Cmd {
    program: &'static str,
    args: Vec<String>,
}

impl Cmd {
    fn new(program: &'static str, args: &[&str]) -> Self {
        Self {
            program,
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        }
    }
}

impl fmt::Display for Cmd {
    /// As a shell would need it typed, so a dry run's commands can be pasted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program)?;
        for arg in &self.args {
            let plain = arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+%,".contains(c));
            if plain {
                write!(f, " {arg}")?;
            } else {
                write!(f, " '{}'", arg.replace('\'', r"'\''"))?;
            }
        }
        Ok(())
    }
}

enum Step {
    CreateDir(PathBuf),
    Write {
        path: PathBuf,
        contents: String,
    },
    Remove(PathBuf),
    /// A command that must succeed; `hint` is added to its error.
    Run {
        cmd: Cmd,
        hint: &'static str,
    },
    /// A command whose failure is expected and harmless, e.g. unloading a job not loaded.
    RunMayFail {
        cmd: Cmd,
        why: &'static str,
    },
}

fn install_steps(platform: Platform, spec: &ServiceSpec, file: &Path) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    match platform {
        Platform::Linux => {
            let contents = service_unit::systemd_unit(spec)?;
            // Asks the user manager first: without one, nothing gets written.
            steps.push(systemctl(&["daemon-reload"], NO_USER_SESSION_HINT));
            push_create_dir(&mut steps, file.parent());
            steps.push(Step::Write {
                path: file.to_path_buf(),
                contents,
            });
            steps.push(systemctl(&["daemon-reload"], ""));
            steps.push(systemctl(&["enable", SYSTEMD_UNIT], ""));
            // Starts it, or restarts it so that a reinstall runs the new binary and file.
            steps.push(systemctl(&["restart", SYSTEMD_UNIT], ""));
        }
        Platform::Macos => {
            let contents = service_unit::launchd_plist(spec)?;
            let domain = gui_domain()?;
            let service = format!("{domain}/{LAUNCHD_LABEL}");
            steps.push(Step::RunMayFail {
                cmd: Cmd::new("launchctl", &["bootout", &service]),
                why: "unloads an earlier install; fails harmlessly when none is loaded",
            });
            push_create_dir(&mut steps, file.parent());
            push_create_dir(&mut steps, launchd_log_files(&spec.home).0.parent());
            steps.push(Step::Write {
                path: file.to_path_buf(),
                contents,
            });
            // Clears a `launchctl disable` left from before, which would block bootstrap.
            steps.push(Step::Run {
                cmd: Cmd::new("launchctl", &["enable", &service]),
                hint: "",
            });
            let plist = file.to_string_lossy();
            steps.push(Step::Run {
                cmd: Cmd::new("launchctl", &["bootstrap", &domain, &plist]),
                hint: " (is this a logged-in desktop session? over SSH there may be no gui domain)",
            });
        }
    }
    Ok(steps)
}

fn uninstall_steps(platform: Platform, file: &Path) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    match platform {
        Platform::Linux => {
            steps.push(systemctl(
                &["disable", "--now", SYSTEMD_UNIT],
                NO_USER_SESSION_HINT,
            ));
            steps.push(Step::Remove(file.to_path_buf()));
            steps.push(systemctl(&["daemon-reload"], ""));
        }
        Platform::Macos => {
            let service = format!("{}/{LAUNCHD_LABEL}", gui_domain()?);
            steps.push(Step::RunMayFail {
                cmd: Cmd::new("launchctl", &["bootout", &service]),
                why: "stops and unloads it; fails harmlessly when it is not loaded",
            });
            steps.push(Step::Remove(file.to_path_buf()));
        }
    }
    Ok(steps)
}

const NO_USER_SESSION_HINT: &str = " (no systemd user session: in a container or over SSH without lingering there may be none; run `maestra serve` yourself)";

fn systemctl(args: &[&str], hint: &'static str) -> Step {
    let mut all = vec!["--user"];
    all.extend_from_slice(args);
    Step::Run {
        cmd: Cmd::new("systemctl", &all),
        hint,
    }
}

fn push_create_dir(steps: &mut Vec<Step>, dir: Option<&Path>) {
    if let Some(dir) = dir.filter(|dir| !dir.is_dir()) {
        steps.push(Step::CreateDir(dir.to_path_buf()));
    }
}

/// launchd's per-user domain, `gui/<uid>`.
fn gui_domain() -> anyhow::Result<String> {
    let output = Command::new("id")
        .arg("-u")
        .output()
        .context("cannot run `id -u` to learn your user id")?;
    let uid = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_digit()) {
        bail!("`id -u` did not print a user id");
    }
    Ok(format!("gui/{uid}"))
}

fn print_dry_run(steps: &[Step]) {
    println!("Dry run: nothing is written and no service is changed. Would:");
    for step in steps {
        match step {
            Step::CreateDir(dir) => println!("- create the folder {}", dir.display()),
            Step::Write { path, contents } => {
                println!("- write {}:", path.display());
                for line in contents.lines() {
                    println!("    {line}");
                }
            }
            Step::Remove(path) => println!("- remove {}", path.display()),
            Step::Run { cmd, .. } => println!("- run: {cmd}"),
            Step::RunMayFail { cmd, why } => println!("- run: {cmd}   ({why})"),
        }
    }
}

/// Runs the steps in order. If one fails after a file was written, the file is put back.
fn execute(steps: &[Step]) -> anyhow::Result<()> {
    // The file written so far, and what it held before (None: it did not exist).
    let mut written: Option<(&Path, Option<Vec<u8>>)> = None;
    for step in steps {
        let result = match step {
            Step::CreateDir(dir) => {
                fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
            }
            Step::Write { path, contents } => {
                let before = match fs::read(path) {
                    Ok(bytes) => Some(bytes),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot read {}", path.display()));
                    }
                };
                let result = write_file(path, contents.as_bytes());
                if result.is_ok() {
                    written = Some((path, before));
                    println!("wrote {}", path.display());
                }
                result
            }
            Step::Remove(path) => match fs::remove_file(path) {
                Ok(()) => {
                    println!("removed {}", path.display());
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
            },
            Step::Run { cmd, hint } => run(cmd).map_err(|e| anyhow::anyhow!("{e}{hint}")),
            Step::RunMayFail { cmd, .. } => match run(cmd) {
                Err(missing @ RunError::Missing(_)) => Err(missing.into()),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            // One line: what failed, then what state it left.
            bail!(match written {
                None => format!("{e:#}; nothing was changed"),
                Some((path, before)) => match restore(path, before) {
                    Ok(()) => format!("{e:#}; {} was put back as it was", path.display()),
                    Err(undo) => format!(
                        "{e:#}; {} could not be put back ({undo:#}): remove it by hand",
                        path.display()
                    ),
                },
            });
        }
    }
    Ok(())
}

/// Writes the whole file or nothing: a temporary file renamed over the old one.
fn write_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let temp = path.with_extension("maestra-tmp");
    let write = || -> io::Result<()> {
        let mut file = fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        anyhow::Error::new(e).context(format!("cannot write {}", path.display()))
    })
}

fn restore(path: &Path, before: Option<Vec<u8>>) -> anyhow::Result<()> {
    match before {
        Some(bytes) => write_file(path, &bytes),
        None => fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("`{0}` was not found: the auto-start service needs it")]
    Missing(&'static str),
    #[error("cannot run `{0}`: {1}")]
    Spawn(String, io::Error),
    #[error("`{0}` failed: {1}")]
    Failed(String, String),
}

fn run(cmd: &Cmd) -> Result<(), RunError> {
    let output = match Command::new(cmd.program).args(&cmd.args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(RunError::Missing(cmd.program));
        }
        Err(e) => return Err(RunError::Spawn(cmd.to_string(), e)),
    };
    if output.status.success() {
        println!("ran {cmd}");
        return Ok(());
    }
    // The tool's own words, on one line.
    let said: Vec<String> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&output.stdout).lines())
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    let detail = if said.is_empty() {
        output.status.to_string()
    } else {
        said.join("; ")
    };
    Err(RunError::Failed(cmd.to_string(), detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_print_as_they_would_be_typed() {
        let cmd = Cmd::new(
            "launchctl",
            &["bootstrap", "gui/501", "/Users/a b/it's.plist"],
        );
        assert_eq!(
            cmd.to_string(),
            r"launchctl bootstrap gui/501 '/Users/a b/it'\''s.plist'"
        );
    }

    #[test]
    fn a_failed_step_after_the_write_puts_the_old_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maestra.service");
        fs::write(&path, "old\n").unwrap();
        let steps = [
            Step::Write {
                path: path.clone(),
                contents: "new\n".to_owned(),
            },
            Step::Run {
                cmd: Cmd::new("false", &[]),
                hint: "",
            },
        ];
        let err = execute(&steps).unwrap_err();
        assert_eq!(fs::read_to_string(&path).unwrap(), "old\n");
        assert!(format!("{err:#}").contains("put back"), "{err:#}");
    }

    #[test]
    fn a_failed_step_after_a_first_write_removes_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maestra.service");
        let steps = [
            Step::Write {
                path: path.clone(),
                contents: "new\n".to_owned(),
            },
            Step::Run {
                cmd: Cmd::new("false", &[]),
                hint: "",
            },
        ];
        execute(&steps).unwrap_err();
        assert!(!path.exists());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temp file left"
        );
    }

    #[test]
    fn a_command_that_may_fail_does_not_stop_the_steps_but_a_missing_tool_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unit");
        let may_fail = |program| Step::RunMayFail {
            cmd: Cmd::new(program, &[]),
            why: "",
        };
        let write = || Step::Write {
            path: path.clone(),
            contents: "x".to_owned(),
        };
        execute(&[may_fail("false"), write()]).unwrap();
        assert!(path.exists());
        fs::remove_file(&path).unwrap();

        let err = execute(&[may_fail("maestra-no-such-tool"), write()]).unwrap_err();
        assert!(format!("{err:#}").contains("was not found"), "{err:#}");
        assert!(!path.exists());
    }
}
