//! The README's examples, run in the README's order on a fresh data folder, as a newcomer runs
//! them after `cargo install --path .`: each must give the output the README shows. Also the
//! README's other promises that a reader acts on: the MCP config is safe to paste, the limits
//! and statuses it states are the binary's.
//!
//! In the examples' output, `…` stands for anything (ids, times, latencies); runs of spaces
//! count as one (column widths follow the port numbers). The README's ports are the test's:
//! 8825 is the local server's, 8000 a cloud server's, 8001 a port where nothing listens.

use std::path::Path;
use std::process::Stdio;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{ServerProcess, spawn_cloud_app};

const README: &str = include_str!("../../README.md");

/// One fenced block: its language, its text, and whether prose came between it and the
/// previous block (an output block follows its command directly).
#[derive(Debug, Clone)]
struct Block {
    lang: String,
    text: String,
    follows_block: bool,
    section: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut lines = markdown.lines();
    let mut section = String::new();
    let mut prose_since_block = true;
    while let Some(line) = lines.next() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading.trim().to_owned();
        }
        let trimmed = line.trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            let indent = line.len() - trimmed.len();
            let mut text = String::new();
            for inner in lines.by_ref() {
                if inner.trim_start().starts_with("```") {
                    break;
                }
                text.push_str(inner.get(indent..).unwrap_or(inner.trim_start()));
                text.push('\n');
            }
            found.push(Block {
                lang: lang.trim().to_owned(),
                text,
                follows_block: !prose_since_block,
                section: section.clone(),
            });
            prose_since_block = false;
        } else if !line.trim().is_empty() {
            prose_since_block = true;
        }
    }
    found
}

/// One example: what to run, and what it must print (none: only that it succeeds).
#[derive(Debug)]
struct Example {
    lang: String,
    code: String,
    expected: Option<String>,
    /// The expected output was a JSON block: compared without its line breaks.
    expected_json: bool,
}

/// The commands that a newcomer types into a terminal are not run again here: the server
/// is already running (started by the test, as `maestra serve`), and the test suite is this.
const NOT_RUN: &[&str] = &["cargo run --release -- serve", "bash .ci/run"];

/// The sections whose examples a newcomer runs on their own machine, in order. (The cloud,
/// Docker, Replit and auto-start examples need what a laptop does not have; their own tests
/// cover them.)
const SECTIONS: &[&str] = &[
    "Set up",
    "Using it",
    "Clients: `maestra ask`, `maestra health`, `maestra mcp`",
    "Model providers",
    "What local mode keeps on disk",
];

fn examples() -> Vec<Example> {
    let all = blocks(README);
    let mut examples: Vec<Example> = Vec::new();
    for block in all
        .iter()
        .filter(|b| SECTIONS.contains(&b.section.as_str()))
    {
        let runnable = matches!(
            block.lang.as_str(),
            "bash" | "console" | "javascript" | "python"
        );
        if !runnable {
            // Output of the example just before, when it follows it directly.
            if block.follows_block
                && let Some(last) = examples.last_mut()
                && last.expected.is_none()
                && !block.text.contains("mcpServers")
            {
                last.expected = Some(block.text.clone());
                last.expected_json = block.lang == "json";
            }
            continue;
        }
        match block.lang.as_str() {
            "bash" => examples.extend(bash_examples(&block.text)),
            "console" => examples.extend(console_examples(&block.text)),
            lang => examples.push(Example {
                lang: lang.to_owned(),
                code: block.text.clone(),
                expected: None,
                expected_json: false,
            }),
        }
    }
    // The server is already running: a second one on the same folder would refuse to start.
    examples
        .retain(|e| !NOT_RUN.contains(&e.code.trim()) && !e.code.trim().ends_with("maestra serve"));
    examples
}

/// A bash block: commands (with `\` continuations, an end-of-line `# comment` dropped), each
/// followed by the `# output` lines that show what it prints.
fn bash_examples(text: &str) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    let mut command = String::new();
    for line in text.lines() {
        if let Some(output) = line.strip_prefix("# ") {
            if let Some(last) = examples.last_mut() {
                let output = output.split("        ← on stderr").next().unwrap_or(output);
                let expected = last.expected.get_or_insert_with(String::new);
                expected.push_str(output.trim_end());
                expected.push('\n');
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let code = match line.find("  # ") {
            Some(at) => &line[..at],
            None => line,
        };
        command.push_str(code.trim_end());
        if command.ends_with('\\') {
            command.push('\n');
            continue;
        }
        examples.push(Example {
            lang: "bash".to_owned(),
            code: std::mem::take(&mut command),
            expected: None,
            expected_json: false,
        });
    }
    examples
}

/// A console block: `$ command` lines, each followed by what it prints.
fn console_examples(text: &str) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    for line in text.lines() {
        if let Some(command) = line.strip_prefix("$ ") {
            let code = match command.find("  # ") {
                Some(at) => &command[..at],
                None => command,
            };
            examples.push(Example {
                lang: "bash".to_owned(),
                code: code.trim_end().to_owned(),
                expected: Some(String::new()),
                expected_json: false,
            });
        } else if let Some(last) = examples.last_mut() {
            let expected = last.expected.get_or_insert_with(String::new);
            expected.push_str(line);
            expected.push('\n');
        }
    }
    examples
}

/// Whether `actual` is what `expected` shows: `…` stands for anything, runs of spaces count
/// as one, trailing spaces and blank lines do not count.
fn matches(expected: &str, actual: &str) -> bool {
    let normalize = |text: &str| {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (expected, actual) = (normalize(expected), normalize(actual));
    let parts: Vec<&str> = expected.split('…').collect();
    let Some((first, rest)) = parts.split_first() else {
        return actual.is_empty();
    };
    let Some(mut remaining) = actual.strip_prefix(first) else {
        return false;
    };
    for (i, part) in rest.iter().enumerate() {
        if i == rest.len() - 1 {
            return remaining.ends_with(part);
        }
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.is_empty()
}

/// A JSON block as the server writes it: on one line.
fn one_line(json: &str) -> String {
    json.lines().map(str::trim).collect::<Vec<_>>().join("")
}

struct Ports {
    local: u16,
    cloud: u16,
    closed: u16,
}

fn with_ports(text: &str, ports: &Ports) -> String {
    text.replace(":8825", &format!(":{}", ports.local))
        .replace(":8000", &format!(":{}", ports.cloud))
        .replace(":8001", &format!(":{}", ports.closed))
}

/// The Python that runs the README's Python (it needs `requests`): `.ci/run` names one.
fn python() -> String {
    match std::env::var("MAESTRA_TEST_PYTHON") {
        // Absolute: the examples run in their own folder.
        Ok(path) => std::fs::canonicalize(&path)
            .unwrap_or_else(|e| panic!("MAESTRA_TEST_PYTHON={path}: {e}"))
            .display()
            .to_string(),
        Err(_) => "python3".to_owned(),
    }
}

/// Runs one example in `home` with `maestra` on PATH; its stdout and stderr, and success.
async fn run(example: &Example, home: &Path, ports: &Ports) -> (String, bool) {
    let code = with_ports(&example.code, ports);
    let bin = Path::new(env!("CARGO_BIN_EXE_maestra")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = match example.lang.as_str() {
        "bash" => {
            let mut c = tokio::process::Command::new("bash");
            c.arg("-c").arg(format!("exec 2>&1\n{code}"));
            c
        }
        "javascript" => {
            let mut c = tokio::process::Command::new("node");
            c.args(["--input-type=module", "-e", &code]);
            c
        }
        "python" => {
            let mut c = tokio::process::Command::new(python());
            c.args(["-c", &code]);
            c
        }
        other => panic!("no way to run {other}"),
    };
    // A newcomer's shell: no MAESTRA_* settings, a home of their own.
    for (name, _) in std::env::vars() {
        if name.starts_with("MAESTRA_") || name == "DATABASE_URL" || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
        .env("HOME", home)
        .env("PATH", path)
        .current_dir(home)
        .stdin(Stdio::null());
    let output = command.output().await.unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (text, output.status.success())
}

#[sqlx::test(migrations = false)]
async fn the_readmes_examples_give_the_output_the_readme_shows(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join(".8825");
    std::fs::create_dir(&data).unwrap();
    // `maestra serve` as the set-up section starts it: local mode, data in ~/.8825.
    let local = ServerProcess::start(&data, &[("HOME", home.path().to_str().unwrap())]).await;
    // The cloud-mode server that `maestra health`'s example has on this machine.
    let cloud = spawn_cloud_app(&db, &[]).await;
    let ports = Ports {
        local: local.port,
        cloud: cloud
            .app
            .address
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap(),
        closed: {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        },
    };

    let examples = examples();
    assert!(examples.len() >= 12, "examples found: {examples:#?}");
    let mut shown = 0;
    for example in &examples {
        let (actual, succeeded) = run(example, home.path(), &ports).await;
        let Some(expected) = &example.expected else {
            assert!(succeeded, "{}\nfailed:\n{actual}", example.code);
            continue;
        };
        shown += 1;
        let expected = with_ports(expected, &ports);
        let expected = if example.expected_json {
            one_line(&expected)
        } else {
            expected
        };
        assert!(
            matches(&expected, &actual),
            "the README's example\n{}\nshows\n{expected}\nbut gave\n{actual}",
            example.code
        );
    }
    assert!(shown >= 8, "examples with output: {shown}");
}

#[test]
fn the_matcher_takes_ellipses_for_anything_and_spaces_as_one() {
    assert!(matches("a … c", "a bbb c"));
    assert!(matches("x  y\n…\nz", "x y\nmore\nlines\nz\n"));
    assert!(matches("seq\":…,", "seq\":4,"));
    assert!(!matches("a … c", "a bbb d"));
    assert!(!matches("abc", "abcd"));
}

#[test]
fn the_mcp_config_is_safe_to_paste() {
    let config = blocks(README)
        .into_iter()
        .find(|b| b.lang == "json" && b.text.contains("mcpServers"))
        .expect("the README's mcp_config.json");
    let config: Value = serde_json::from_str(&config.text).unwrap();
    let server = &config["mcpServers"]["conversation-hub-mcp"];
    assert_eq!(server["command"], "maestra");
    assert_eq!(server["args"], serde_json::json!(["mcp"]));
    let mut vars: std::collections::HashMap<String, String> = server["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    vars.insert("HOME".to_owned(), "/nonexistent".to_owned());
    let settings = maestra::client::ClientSettings::from_vars(&vars).unwrap();
    // Pasted as it is, nothing leaves the machine: no host the user does not control.
    assert!(!settings.fallback_enabled, "{server}");
    assert!(settings.cloud_url.is_none(), "{server}");
    assert_eq!(settings.local_url.as_str(), "http://127.0.0.1:8825/");
}

/// The README's words for a limit, e.g. "`limit` 1–100".
fn stated_range(after: &str) -> (usize, usize) {
    let at = README
        .find(after)
        .unwrap_or_else(|| panic!("{after:?} in the README"));
    let text = &README[at + after.len()..];
    let digits = |s: &str| -> (usize, usize) {
        let end = s.find(|c: char| !c.is_ascii_digit() && c != ',').unwrap();
        (s[..end].replace(',', "").parse().unwrap(), end)
    };
    let (low, end) = digits(text);
    let text = &text[end..];
    let text = text.strip_prefix('–').expect("a range like 1–100");
    (low, digits(text).0)
}

#[tokio::test]
async fn the_list_limits_the_readme_states_are_the_servers() {
    let app = crate::helpers::spawn_app().await;
    app.say("ana", "cli", Some("conv_l"), "hello").await;
    for (stated, path) in [
        (
            "conversations per page: `limit` ",
            "/api/maestra/conversations?user_id=ana",
        ),
        (
            "messages per page: `limit` ",
            "/api/maestra/conversations/conv_l?user_id=ana",
        ),
    ] {
        let (low, high) = stated_range(stated);
        for (limit, status) in [
            (low, 200),
            (high, 200),
            (low.saturating_sub(1), 400),
            (high + 1, 400),
        ] {
            let response = app.get(&format!("{path}&limit={limit}")).await;
            assert_eq!(response.status(), status, "{path} limit={limit}");
        }
    }
}

#[sqlx::test(migrations = false)]
async fn the_metrics_statuses_the_readme_states_are_the_servers(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let route = README
        .lines()
        .find(|l| l.starts_with("| `GET /metrics`"))
        .unwrap();
    assert!(
        route.contains("401 for a missing or wrong token"),
        "{route}"
    );
    assert!(
        route.contains("403 while that variable is unset"),
        "{route}"
    );
    let cloud = spawn_cloud_app(&db, &[("MAESTRA_METRICS_TOKEN", "metrics-token-1")]).await;
    let scrape = |token: Option<&'static str>| {
        let request = cloud.request(reqwest::Method::GET, "/metrics", None);
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        request.send()
    };
    assert_eq!(scrape(Some("wrong-token")).await.unwrap().status(), 401);
    assert_eq!(scrape(None).await.unwrap().status(), 401);
    assert_eq!(scrape(Some("metrics-token-1")).await.unwrap().status(), 200);
    let unset = spawn_cloud_app(&db, &[]).await;
    let response = unset
        .request(reqwest::Method::GET, "/metrics", None)
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

#[test]
fn the_set_up_section_has_two_commands_and_says_what_the_test_command_does() {
    let set_up: Vec<Block> = blocks(README)
        .into_iter()
        .filter(|b| b.section == "Set up")
        .collect();
    let commands: Vec<String> = set_up
        .iter()
        .flat_map(|b| bash_examples(&b.text))
        .map(|e| e.code)
        .filter(|c| !c.starts_with("curl"))
        .collect();
    assert_eq!(commands, ["cargo run --release -- serve", "bash .ci/run"]);
    // Next to the test command: what it does to the machine.
    let after = &README[README.find("bash .ci/run\n```").unwrap()..];
    let note = &after[..after.find("Then, from another terminal").unwrap()];
    for says in ["root", "apt-get", "pg_hba.conf", "installs"] {
        assert!(note.contains(says), "{says:?} missing from {note}");
    }
    // Before the first `maestra` command, how to get `maestra` on PATH.
    let first_use = README.find("\nmaestra ").unwrap();
    assert!(README[..first_use].contains("cargo install --path ."));
}
