//! `maestra install` / `uninstall` through the real binary, with a home folder of the test's
//! own and no reachable service manager: dry runs change nothing, a real install that cannot
//! reach systemd fails in one clear line and leaves nothing behind, uninstall keeps the data.

use std::path::Path;

use crate::helpers::{file_in_dry_run, maestra, maestra_binary, stderr, stdout, tree};

fn unit_file(home: &Path) -> std::path::PathBuf {
    home.join(".config/systemd/user/maestra.service")
}

#[test]
fn install_dry_run_prints_the_file_and_commands_and_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let before = {
        maestra(home); // creates the runtime folder, so it is in `before` too
        tree(home)
    };

    let output = maestra(home)
        .args(["install", "--dry-run", "--platform", "linux"])
        .env("MAESTRA_PORT", "8832")
        .env("MAESTRA_API_KEY", "sk_test_must_not_leak")
        .env("MAESTRA_LLM_API_KEY", "sk_llm_must_not_leak")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let (out, err) = (stdout(&output), stderr(&output));

    let unit = file_in_dry_run(&out, &unit_file(home));
    let exec = format!("ExecStart=\"{}\" serve", maestra_binary().display());
    assert!(unit.lines().any(|l| l == exec), "{exec} in:\n{unit}");
    assert!(unit.contains("Environment=\"MAESTRA_PORT=8832\""), "{unit}");
    for command in [
        "- run: systemctl --user daemon-reload",
        "- run: systemctl --user enable maestra.service",
        "- run: systemctl --user restart maestra.service",
    ] {
        assert!(out.lines().any(|l| l == command), "{command} in:\n{out}");
    }
    assert!(!out.contains("must_not_leak") && !err.contains("must_not_leak"));
    assert!(
        err.contains("MAESTRA_API_KEY is set but is not written"),
        "{err}"
    );
    assert_eq!(tree(home), before, "a dry run wrote something");
}

#[test]
fn install_dry_run_can_show_the_binary_the_installer_will_copy() {
    let home = tempfile::tempdir().unwrap();
    let target = home.path().join("bin/maestra");
    let output = maestra(home.path())
        .args(["install", "--dry-run", "--platform", "linux", "--binary"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let unit = file_in_dry_run(&stdout(&output), &unit_file(home.path()));
    assert!(
        unit.contains(&format!("ExecStart=\"{}\" serve", target.display())),
        "{unit}"
    );
    assert!(!target.exists());

    let output = maestra(home.path())
        .args(["install", "--dry-run", "--binary", "bin/maestra"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("must be an absolute path"));
}

#[test]
fn platform_without_dry_run_is_a_usage_error() {
    let home = tempfile::tempdir().unwrap();
    let output = maestra(home.path())
        .args(["install", "--platform", "macos"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

/// Without a service manager to register with, install must not leave a file that nothing
/// will ever start: it fails before writing, in one line that says why and what to do.
#[cfg(target_os = "linux")]
#[test]
fn install_without_a_systemd_user_session_fails_clearly_and_writes_nothing() {
    // (case, PATH, what the error must say)
    let cases = [
        ("no user bus", None, "systemd user session"),
        (
            "no systemctl at all",
            Some("/nonexistent"),
            "`systemctl` was not found",
        ),
    ];
    for (case, path, expected) in cases {
        let home = tempfile::tempdir().unwrap();
        let home = home.path();
        let before = {
            maestra(home);
            tree(home)
        };
        let mut command = maestra(home);
        if let Some(path) = path {
            command.env("PATH", path);
        }
        let output = command.arg("install").output().unwrap();
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{case}: {output:?}");
        assert_eq!(err.lines().count(), 1, "{case}: one line: {err}");
        assert!(err.starts_with("maestra: "), "{case}: {err}");
        assert!(err.contains(expected), "{case}: {err}");
        assert!(err.contains("nothing was changed"), "{case}: {err}");
        assert_eq!(tree(home), before, "{case}: install left something behind");
    }
}

#[test]
fn uninstall_when_not_installed_succeeds_and_says_so() {
    let home = tempfile::tempdir().unwrap();
    let output = maestra(home.path()).arg("uninstall").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("not installed"));
}

/// Uninstall removes the unit only after systemd has stopped and disabled it, and never
/// touches the data folder, whatever happens.
#[cfg(target_os = "linux")]
#[test]
fn uninstall_keeps_the_data_folder_and_does_not_remove_a_unit_systemd_still_runs() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let data = home.join(".8825");
    std::fs::create_dir_all(data.join("conversations")).unwrap();
    std::fs::write(data.join("conversations/conv_keep.json"), "{}\n").unwrap();
    let unit = unit_file(home);
    std::fs::create_dir_all(unit.parent().unwrap()).unwrap();
    std::fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();

    let dry = maestra(home)
        .args(["uninstall", "--dry-run"])
        .output()
        .unwrap();
    assert!(dry.status.success(), "{dry:?}");
    let out = stdout(&dry);
    for line in [
        "- run: systemctl --user disable --now maestra.service".to_owned(),
        format!("- remove {}", unit.display()),
    ] {
        assert!(out.lines().any(|l| l == line), "{line} in:\n{out}");
    }
    assert!(
        !out.contains(".8825"),
        "uninstall plans to touch the data: {out}"
    );
    assert!(unit.exists());

    // No user manager here: it cannot stop the service, so it must not delete its file.
    let real = maestra(home).arg("uninstall").output().unwrap();
    assert_eq!(real.status.code(), Some(1), "{real:?}");
    assert!(stderr(&real).contains("nothing was changed"), "{real:?}");
    assert!(unit.exists());
    assert!(data.join("conversations/conv_keep.json").exists());
}
