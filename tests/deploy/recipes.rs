//! The recipes that cannot be run here (no Docker engine, no Replit) must not rot: their key
//! lines are checked, and CI runs the very build command they run.

use std::path::Path;

const BUILD: &str = "cargo build --release --locked";

fn read(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A Dockerfile's instructions: continuation lines joined, comments dropped.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .into_iter()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (keyword, rest) = line.split_once(' ').unwrap_or((&line, ""));
            (keyword.to_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_dockerfile_builds_with_the_locked_release_build_and_runs_slim_as_non_root() {
    let all = instructions(&read("Dockerfile"));
    let stages: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let (build, runtime) = (&all[stages[0]..stages[1]], &all[*stages.last().unwrap()..]);
    let has = |stage: &[(String, String)], keyword: &str, needle: &str| {
        stage
            .iter()
            .any(|(k, rest)| k == keyword && rest.contains(needle))
    };

    assert!(
        has(build, "FROM", "rust:"),
        "the build stage is a Rust image"
    );
    assert!(has(build, "FROM", " AS build"), "named for COPY --from");
    // Dependencies are built from the manifests alone, before the sources are copied.
    let manifests = build
        .iter()
        .position(|(k, r)| k == "COPY" && r.contains("Cargo.toml") && r.contains("Cargo.lock"))
        .expect("COPY Cargo.toml Cargo.lock");
    let sources = build
        .iter()
        .position(|(k, r)| k == "COPY" && r.starts_with(". "))
        .expect("COPY . .");
    let builds: Vec<usize> = build
        .iter()
        .enumerate()
        .filter(|(_, (k, r))| k == "RUN" && r.contains(BUILD))
        .map(|(i, _)| i)
        .collect();
    assert!(
        builds.len() == 2 && manifests < builds[0] && builds[0] < sources && sources < builds[1],
        "deps built between the manifests and the sources, then the crate: {build:?}"
    );
    // COPY keeps the sources' older times: without a touch cargo keeps the placeholder binary.
    assert!(
        build[builds[1]].1.contains("touch src/main.rs src/lib.rs"),
        "{:?}",
        build[builds[1]]
    );

    assert!(has(runtime, "FROM", "debian:"), "slim Debian runtime");
    assert!(has(runtime, "FROM", "-slim"), "slim Debian runtime");
    assert!(
        has(runtime, "COPY", "--from=build"),
        "binary from the build stage"
    );
    assert!(
        has(runtime, "COPY", "migrations"),
        "migrations in the image"
    );
    assert!(
        has(runtime, "COPY", "/src/LICENSE "),
        "the GPL text beside the binary it covers"
    );
    assert!(has(runtime, "ENV", "MAESTRA_MODE=cloud"));
    assert!(has(runtime, "EXPOSE", "8000"));
    assert!(has(runtime, "HEALTHCHECK", "/health"));
    assert!(has(runtime, "HEALTHCHECK", "curl"));
    assert!(
        has(runtime, "RUN", "install") && has(runtime, "RUN", " curl"),
        "curl installed"
    );
    assert!(has(runtime, "STOPSIGNAL", "SIGTERM"));
    assert!(
        has(runtime, "CMD", r#"["maestra", "serve"]"#),
        "exec form CMD"
    );
    let users: Vec<&str> = runtime
        .iter()
        .filter(|(k, _)| k == "USER")
        .map(|(_, r)| r.as_str())
        .collect();
    let last_user = users.last().expect("a USER in the runtime stage");
    let name = last_user.split(':').next().unwrap();
    assert!(name != "root" && name != "0", "runs as {last_user}");
}

#[test]
fn the_docker_context_leaves_out_build_output_and_git() {
    let ignore = read(".dockerignore");
    let entries: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["target/", ".git"] {
        assert!(entries.contains(&needed), "{needed} in .dockerignore");
    }
    for kept in [
        "src",
        "config",
        "Cargo.toml",
        "Cargo.lock",
        "benches",
        "migrations",
        "LICENSE",
    ] {
        assert!(
            !entries.iter().any(|e| e.trim_end_matches('/') == kept),
            "{kept} is needed by the build"
        );
    }
}

#[test]
fn ci_runs_the_same_build_command_as_the_image() {
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == BUILD),
        ".ci/run runs `{BUILD}`"
    );
}

#[test]
fn replit_builds_the_same_way_and_serves_cloud_mode_on_8000() {
    let replit: toml::Table = read(".replit").parse().unwrap();
    let deployment = replit["deployment"].as_table().unwrap();
    let words = |value: &toml::Value| {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(words(&deployment["build"]), BUILD);
    let run = words(&deployment["run"]);
    assert!(run.contains("target/release/maestra serve"), "{run}");
    assert!(run.contains("MAESTRA_MODE=${MAESTRA_MODE:-cloud}"), "{run}");
    assert!(run.contains("MAESTRA_PORT=${MAESTRA_PORT:-8000}"), "{run}");
    let ports = replit["ports"].as_array().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["localPort"].as_integer() == Some(8000)),
        "{ports:?}"
    );
    let nix = read("replit.nix");
    assert!(nix.contains("deps = ["), "{nix}");
}

#[test]
fn the_install_script_is_valid_bash_and_builds_the_same_way() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("install_maestra_local.sh");
    let status = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success(), "bash -n {}", script.display());
    let text = read("install_maestra_local.sh");
    assert!(text.contains("set -euo pipefail"));
    assert!(text.contains(BUILD));
}

/// The value after `key:` on the first line that has it (YAML read as text: these files keep
/// one setting per line).
fn yaml_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key}"))
        .trim()
        .trim_matches('"')
        .to_owned()
}

#[test]
fn the_compose_file_runs_replicas_on_redis_behind_haproxy_checking_readiness() {
    let compose = read("docker-compose.yml");
    assert_eq!(yaml_value(&compose, "MAESTRA_RATE_LIMIT_BACKEND"), "redis");
    assert_eq!(
        yaml_value(&compose, "MAESTRA_REPLICAS"),
        yaml_value(&compose, "replicas"),
        "each replica's share assumes every replica"
    );
    assert!(compose.contains("./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg"));
    let haproxy = read("deploy/haproxy.cfg");
    assert!(haproxy.contains("option httpchk GET /health/ready"));
    assert!(haproxy.contains("server-template maestra 10 maestra:8000"));
    // The real parser checks the rest (haproxy -c in .ci/run).
}

#[test]
fn the_kubernetes_deployment_probes_live_and_ready_and_takes_settings_from_the_environment() {
    let deployment = read("deploy/k8s/deployment.yaml");
    let probe_path = |probe: &str| {
        let after = deployment.split(&format!("{probe}:")).nth(1).unwrap();
        yaml_value(after, "path")
    };
    assert_eq!(probe_path("livenessProbe"), "/health/live");
    assert_eq!(probe_path("readinessProbe"), "/health/ready");
    assert!(deployment.contains("configMapRef:") && deployment.contains("secretRef:"));
    let config = read("deploy/k8s/configmap.yaml");
    assert_eq!(
        yaml_value(&config, "MAESTRA_REPLICAS"),
        yaml_value(&deployment, "maxReplicas"),
        "each pod's share assumes the autoscaler's maximum"
    );
    for secret in ["DATABASE_URL", "MAESTRA_API_KEY", "MAESTRA_REDIS_URL"] {
        let set_here = config
            .lines()
            .any(|l| l.trim().starts_with(&format!("{secret}:")));
        assert!(!set_here, "{secret} belongs in the Secret");
    }
}
