//! The real `maestra` binary with a clean environment and a home folder of the test's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `maestra` with nothing from the caller's environment but a usual PATH, the given HOME, and
/// no service manager reachable (XDG_RUNTIME_DIR points at an empty folder, so `systemctl
/// --user` finds no bus): a test can never touch the real user's services.
pub fn maestra(home: &Path) -> Command {
    let runtime = home.join(".test-runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_maestra"));
    command
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("XDG_RUNTIME_DIR", &runtime)
        .current_dir(home);
    command
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// The binary the service would run: the test's `maestra`, symlinks resolved.
pub fn maestra_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_maestra"))
        .canonicalize()
        .unwrap()
}

/// The file a dry run shows under `- write <path>:`, with its 4-space indent removed.
pub fn file_in_dry_run(stdout: &str, path: &Path) -> String {
    let header = format!("- write {}:", path.display());
    let mut lines = stdout.lines().skip_while(|line| *line != header);
    assert!(lines.next().is_some(), "no {header:?} in:\n{stdout}");
    let mut text = String::new();
    for line in lines.take_while(|line| line.starts_with("    ") || line.is_empty()) {
        text.push_str(line.strip_prefix("    ").unwrap_or(line));
        text.push('\n');
    }
    text
}

/// Every file and folder under `dir`, relative to it, sorted.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        found.push(path.strip_prefix(dir).unwrap().to_path_buf());
        if path.is_dir() {
            let below = tree(&path);
            found.extend(
                below
                    .into_iter()
                    .map(|p| path.strip_prefix(dir).unwrap().join(p)),
            );
        }
    }
    found.sort();
    found
}
