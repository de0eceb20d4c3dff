//! The service file as launchd and systemd read it: the plist parsed back by a plist parser,
//! the unit verified by `systemd-analyze`. Paths carry the characters that need escaping.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use maestra::service_unit::{ServiceSpec, systemd_unit};
use plist::Value;

use crate::helpers::{file_in_dry_run, maestra, maestra_binary, stdout};

/// A folder name with what XML, systemd and shells each treat specially.
const AWKWARD: &str = "Ana & \"Bo\" <x>'s 100% $HOME \\ dir";
/// The same, less what systemd never accepts in a program's path (quotes, backslashes).
const AWKWARD_FOR_SYSTEMD: &str = "Ana & Bo <x> 100%n $HOME dir";

#[test]
fn the_launchd_plist_parses_and_holds_what_launchd_needs() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join(AWKWARD);
    std::fs::create_dir(&home).unwrap();
    let data_dir = home.join("data & more");

    let output = maestra(&home)
        .args(["install", "--dry-run", "--platform", "macos"])
        .env("MAESTRA_DATA_DIR", &data_dir)
        .env("MAESTRA_PORT", "8831")
        .env("MAESTRA_API_KEY", "sk_test_must_not_leak")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let plist_path = home.join("Library/LaunchAgents/com.8825.maestra.plist");
    let text = file_in_dry_run(&stdout(&output), &plist_path);
    assert!(!text.contains("sk_test_must_not_leak"));

    let plist = Value::from_reader_xml(text.as_bytes()).unwrap();
    let dict = plist.as_dictionary().unwrap();
    let string = |key: &str| dict.get(key).and_then(Value::as_string).unwrap();
    assert_eq!(string("Label"), "com.8825.maestra");
    let arguments: Vec<&str> = dict
        .get("ProgramArguments")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(
        arguments,
        [maestra_binary().to_str().unwrap(), "serve"],
        "an absolute binary path, then serve"
    );
    assert_eq!(
        dict.get("RunAtLoad").and_then(Value::as_boolean),
        Some(true)
    );
    assert_eq!(
        dict.get("KeepAlive").and_then(Value::as_boolean),
        Some(true)
    );
    assert_eq!(
        PathBuf::from(string("StandardOutPath")),
        home.join("Library/Logs/maestra_backend.log")
    );
    assert_eq!(
        PathBuf::from(string("StandardErrorPath")),
        home.join("Library/Logs/maestra_backend_error.log")
    );
    let environment: BTreeMap<&str, &str> = dict
        .get("EnvironmentVariables")
        .and_then(Value::as_dictionary)
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_string().unwrap()))
        .collect();
    assert_eq!(
        environment,
        BTreeMap::from([
            ("MAESTRA_DATA_DIR", data_dir.to_str().unwrap()),
            ("MAESTRA_MODE", "local"),
            ("MAESTRA_PORT", "8831"),
        ])
    );
}

/// Runs `systemd-analyze verify --user` on a unit file; None when the tool is not installed.
fn systemd_verify(unit_file: &Path, runtime_dir: &Path) -> Option<(bool, String)> {
    let output = Command::new("systemd-analyze")
        .args(["verify", "--user"])
        .arg(unit_file)
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .output();
    match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
        Ok(output) => {
            let said = String::from_utf8_lossy(&output.stderr).into_owned();
            // Only what it says about this unit: the user's other units are not ours to judge.
            let about_ours = said
                .lines()
                .filter(|line| line.contains("maestra"))
                .collect::<Vec<_>>()
                .join("\n");
            Some((output.status.success() && about_ours.is_empty(), said))
        }
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let temp = tempfile::tempdir().unwrap();
    // The binary under an awkward folder name: verify fails unless ExecStart is escaped right.
    let bin_dir = temp.path().join(AWKWARD_FOR_SYSTEMD);
    std::fs::create_dir(&bin_dir).unwrap();
    let binary = bin_dir.join("maestra");
    std::os::unix::fs::symlink(maestra_binary(), &binary).unwrap();
    let spec = ServiceSpec {
        binary: binary.clone(),
        home: temp.path().to_path_buf(),
        environment: vec![
            ("MAESTRA_MODE".to_owned(), "local".to_owned()),
            (
                "MAESTRA_DATA_DIR".to_owned(),
                temp.path().join(AWKWARD).to_str().unwrap().to_owned(),
            ),
        ],
    };
    let unit = systemd_unit(&spec).unwrap();

    for expected in [
        "Restart=on-failure",
        "WantedBy=default.target",
        "Environment=\"MAESTRA_MODE=local\"",
    ] {
        assert!(
            unit.lines().any(|l| l == expected),
            "{expected} in:\n{unit}"
        );
    }
    assert!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=") && l.ends_with(" serve")),
        "{unit}"
    );

    let unit_dir = temp.path().join("units");
    let runtime_dir = temp.path().join("runtime");
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::fs::create_dir_all(&runtime_dir).unwrap();
    let unit_file = unit_dir.join("maestra.service");
    std::fs::write(&unit_file, &unit).unwrap();
    let Some((valid, said)) = systemd_verify(&unit_file, &runtime_dir) else {
        eprintln!(
            "SKIPPED the systemd-analyze verify step only: systemd-analyze is not installed (the unit's content was checked above)"
        );
        return;
    };
    assert!(valid, "systemd-analyze verify rejected:\n{unit}\n{said}");

    // The same check catches a unit systemd could not run, so its pass above means something.
    let broken = ServiceSpec {
        binary: bin_dir.join("no-such-maestra"),
        ..spec
    };
    std::fs::write(&unit_file, systemd_unit(&broken).unwrap()).unwrap();
    let (valid, said) = systemd_verify(&unit_file, &runtime_dir).unwrap();
    assert!(!valid, "a missing binary passed verify: {said}");
}
