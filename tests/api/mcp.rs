//! `maestra mcp` as an IDE runs it: the real binary over stdio, driven by rmcp's own client,
//! against real local and cloud servers.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, CallToolResult, ProgressNotificationParam};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Map, Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::clients::{Recorder, closed_url, core_reply, maestra};
use crate::helpers::{TEST_API_KEY, maestra_command, spawn_app, spawn_cloud_app};

/// The IDE's side: keeps the progress notifications it receives.
#[derive(Clone, Default)]
struct Ide {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Ide {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params);
    }
}

struct Session {
    client: RunningService<RoleClient, Ide>,
    _home: tempfile::TempDir,
}

impl Session {
    /// `maestra mcp` started the way the guide's mcp_config.json starts it, with these
    /// variables as its `env`.
    async fn start(vars: &[(&str, &str)]) -> Session {
        let home = tempfile::tempdir().unwrap();
        let mut command = maestra_command(home.path(), vars);
        command.arg("mcp");
        let transport = TokioChildProcess::builder(tokio::process::Command::from(command))
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
            .0;
        let client = Ide::default().serve(transport).await.unwrap();
        Session {
            client,
            _home: home,
        }
    }

    async fn call(&self, tool: &str, arguments: Value) -> CallToolResult {
        let Value::Object(arguments) = arguments else {
            panic!("arguments must be an object")
        };
        self.client
            .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
            .await
            .unwrap()
    }

    fn progress_seen(&self) -> usize {
        self.client.service().progress.lock().unwrap().len()
    }
}

fn is_error(result: &CallToolResult) -> bool {
    result.is_error == Some(true)
}

/// The result's structured JSON (tools answer with it on success).
fn structured(result: &CallToolResult) -> &Value {
    assert!(!is_error(result), "tool error: {}", text(result));
    result.structured_content.as_ref().unwrap()
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[sqlx::test(migrations = false)]
async fn the_ide_lists_the_tools_and_is_answered_by_local_then_by_cloud_when_local_is_down(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let local = spawn_app().await;
    let cloud = spawn_cloud_app(&db, &[]).await;
    let cloud_vars = [
        ("MAESTRA_CLOUD_URL", cloud.app.address.as_str()),
        ("MAESTRA_FALLBACK_ENABLED", "true"),
        ("MAESTRA_API_KEY", TEST_API_KEY),
        ("MAESTRA_USER_ID", "justinharmon"),
    ];
    let mut vars = vec![("MAESTRA_LOCAL_URL", local.address.as_str())];
    vars.extend_from_slice(&cloud_vars);
    let ide = Session::start(&vars).await;

    let tools = ide.client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "maestra_ask",
            "maestra_health",
            "maestra_history",
            "maestra_legacy_ask"
        ]
    );
    let ask = tools.iter().find(|t| t.name == "maestra_ask").unwrap();
    assert!(ask.description.as_deref().unwrap().contains("conversation"));
    let schema = Value::Object(ask.input_schema.as_ref().clone());
    assert_eq!(schema["required"], json!(["message"]), "{schema}");
    assert_eq!(schema["properties"]["surface_id"]["default"], "windsurf");
    for field in ["message", "conversation_id", "user_id"] {
        assert!(schema["properties"][field].is_object(), "{field}: {schema}");
    }

    let answer = ide
        .call("maestra_ask", json!({"message": "Hello from the IDE"}))
        .await;
    let body = structured(&answer);
    assert_eq!(body["backend"], "local");
    assert_eq!(body["surface_id"], "windsurf");
    assert!(
        body["reply"]
            .as_str()
            .unwrap()
            .contains("Hello from the IDE")
    );
    assert!(text(&answer).contains("\"backend\":\"local\""));
    // The first progress notification goes out at once; it may land just after the answer.
    let deadline = Instant::now() + Duration::from_secs(2);
    while ide.progress_seen() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ide.progress_seen() > 0, "no progress notification");

    // The local server is down: the same call is answered by the cloud, and says so.
    let closed = closed_url();
    let mut vars = vec![("MAESTRA_LOCAL_URL", closed.as_str())];
    vars.extend_from_slice(&cloud_vars);
    let ide = Session::start(&vars).await;
    let answer = ide
        .call("maestra_ask", json!({"message": "Hello from the IDE"}))
        .await;
    let body = structured(&answer);
    assert_eq!(body["backend"], "cloud");
    let conversation = body["conversation_id"].as_str().unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages m JOIN conversations c ON c.pk = m.conversation_pk
         WHERE c.id = $1 AND m.surface_id = 'windsurf'",
    )
    .bind(conversation)
    .fetch_one(&cloud.pool)
    .await
    .unwrap();
    assert_eq!(stored, 2, "the cloud stored the question and its reply");

    let health = structured(&ide.call("maestra_health", json!({})).await).clone();
    assert_eq!(health["local"]["status"], "unreachable");
    assert_eq!(health["cloud"]["status"], "healthy");
    assert_eq!(health["any_healthy"], true);
}

#[tokio::test]
async fn a_long_ask_keeps_the_ide_informed_with_progress_until_the_answer() {
    // A backend that takes longer than one progress interval (5 s) to answer.
    let slow = Recorder::start_after(
        Duration::from_millis(6_500),
        200,
        "application/json",
        core_reply("Worth the wait").to_string(),
    );
    let ide = Session::start(&[
        ("MAESTRA_LOCAL_URL", slow.url.as_str()),
        ("MAESTRA_USER_ID", "ana"),
    ])
    .await;
    let answer = ide
        .call("maestra_ask", json!({"message": "Think hard"}))
        .await;
    assert_eq!(structured(&answer)["reply"], "Worth the wait");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let progress = ide.client.service().progress.lock().unwrap().clone();
    let steps: Vec<f64> = progress.iter().map(|p| p.progress).collect();
    // One at once, one when the interval passed; rising, as MCP requires.
    assert!(steps.len() >= 2 && steps[..2] == [0.0, 1.0], "{progress:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    assert!(
        progress[1]
            .message
            .as_deref()
            .unwrap()
            .starts_with("Maestra is replying"),
        "{progress:?}"
    );
}

#[tokio::test]
async fn terminal_and_browser_messages_in_one_conversation_show_in_the_history_the_ide_reads() {
    let app = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let vars = [
        ("MAESTRA_LOCAL_URL", app.address.as_str()),
        ("MAESTRA_USER_ID", "justinharmon"),
    ];
    let first = maestra(home.path(), &vars, &["ask", "--json", "From the terminal"]).await;
    assert!(first.status.success());
    let first: Value = serde_json::from_slice(&first.stdout).unwrap();
    let conversation = first["conversation_id"].as_str().unwrap().to_owned();
    let second = maestra(home.path(), &vars, &["ask", "--json", "Terminal again"]).await;
    let second: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(second["conversation_id"], conversation.as_str());

    // The browser extension, as the guide's fetch() example sends it.
    app.say(
        "justinharmon",
        "browser_ext",
        Some(&conversation),
        "From the browser",
    )
    .await;

    let ide = Session::start(&vars).await;
    let history = ide
        .call("maestra_history", json!({"conversation_id": conversation}))
        .await;
    let page = structured(&history);
    assert_eq!(page["backend"], "local");
    let users: Vec<(&str, &str)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| {
            (
                m["surface_id"].as_str().unwrap(),
                m["content"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        users,
        [
            ("cli", "From the terminal"),
            ("cli", "Terminal again"),
            ("browser_ext", "From the browser")
        ]
    );
    assert_eq!(page["messages"].as_array().unwrap().len(), 6);

    // Paging works through the tool as well.
    let later = ide
        .call(
            "maestra_history",
            json!({"conversation_id": conversation, "after_seq": 4, "limit": 1}),
        )
        .await;
    let later = structured(&later);
    assert_eq!(later["messages"][0]["seq"], 5);
    assert_eq!(later["next_after_seq"], 5);
}

#[tokio::test]
async fn bad_calls_are_tool_errors_and_the_server_keeps_answering() {
    let app = spawn_app().await;
    let vars = [
        ("MAESTRA_LOCAL_URL", app.address.as_str()),
        ("MAESTRA_USER_ID", "ana"),
    ];
    let ide = Session::start(&vars).await;

    let cases = [
        ("maestra_ask", json!({}), "message"),
        ("maestra_ask", json!({"message": 42}), "message"),
        (
            "maestra_ask",
            json!({"message": "   "}),
            "must not be blank",
        ),
        (
            "maestra_ask",
            json!({"message": "x".repeat(40 * 1024)}),
            "413",
        ),
        (
            "maestra_ask",
            json!({"message": "hi", "conversation_id": "../etc"}),
            "conversation_id",
        ),
        (
            "maestra_history",
            json!({"conversation_id": "conv_nope"}),
            "404",
        ),
        ("maestra_history", json!({}), "conversation_id"),
        (
            "maestra_legacy_ask",
            json!({"context": "no question"}),
            "question",
        ),
    ];
    for (tool, arguments, expected) in cases {
        let result = ide.call(tool, arguments.clone()).await;
        let message = text(&result);
        assert!(
            is_error(&result),
            "{tool} {arguments}: not an error: {message}"
        );
        assert!(
            message.contains(expected),
            "{tool}: {message:?} should mention {expected:?}"
        );
        assert!(!message.contains('\n'), "one line: {message}");
    }
    let missing = text(&ide.call("maestra_ask", json!({})).await);
    assert!(
        missing.starts_with("invalid arguments for maestra_ask: missing field `message`"),
        "{missing}"
    );

    // An unknown tool is a protocol error, and still not the end of the session.
    let unknown = ide
        .client
        .call_tool(CallToolRequestParams::new("maestra_nope").with_arguments(Map::new()))
        .await;
    assert!(unknown.is_err());

    let answer = ide
        .call("maestra_ask", json!({"message": "Still there?"}))
        .await;
    assert_eq!(structured(&answer)["backend"], "local");
    let health = ide.call("maestra_health", json!({})).await;
    assert_eq!(structured(&health)["local"]["status"], "healthy");
    // The legacy advisor answers through the same server.
    let advice = ide
        .call(
            "maestra_legacy_ask",
            json!({"question": "What is 8825?", "context": "a repo"}),
        )
        .await;
    assert!(!is_error(&advice), "{}", text(&advice));
    assert!(text(&advice).contains("What is 8825?"), "{}", text(&advice));
}

#[tokio::test]
async fn stdout_carries_only_json_rpc_even_with_debug_logs_on() {
    let app = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let mut command = maestra_command(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", app.address.as_str()),
            ("MAESTRA_USER_ID", "ana"),
            ("RUST_LOG", "debug"),
        ],
    );
    command
        .arg("mcp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let requests = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "maestra_ask", "arguments": {"message": "Hello"}}}),
    ];
    for request in &requests {
        stdin
            .write_all(format!("{request}\n").as_bytes())
            .await
            .unwrap();
    }
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut answered = Vec::new();
    let reading = async {
        while answered.len() < 3 {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("stdout closed early");
            let message: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not JSON on stdout ({e}): {line}"));
            assert_eq!(message["jsonrpc"], "2.0", "{line}");
            if let Some(id) = message.get("id").and_then(Value::as_i64) {
                answered.push((id, message));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("no answers");
    assert_eq!(
        answered.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        answered[2].1["result"]["structuredContent"]["backend"], "local",
        "{}",
        answered[2].1
    );

    // Closing stdin ends the session cleanly; the logs went to stderr.
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("mcp did not stop when stdin closed")
        .unwrap();
    assert!(output.status.success(), "exit: {:?}", output.status);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("DEBUG")
            || String::from_utf8_lossy(&output.stderr).contains("\"level\":\"DEBUG\""),
        "debug logs should be on stderr"
    );
}

/// The keys of a JSON value, at every depth, as paths (`local.status`, `cloud`, …).
fn shape(value: &Value, prefix: &str, into: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (key, inner) in map {
            let path = format!("{prefix}{key}");
            into.push(path.clone());
            shape(inner, &format!("{path}."), into);
        }
    }
    into.sort();
}

#[tokio::test]
async fn maestra_health_and_health_json_give_one_shape() {
    let local = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let vars = [
        ("MAESTRA_LOCAL_URL", local.address.as_str()),
        ("MAESTRA_CLOUD_URL", "http://127.0.0.1:9"),
    ];
    let output = maestra(home.path(), &vars, &["health", "--json"]).await;
    assert!(output.status.success());
    let cli: Value = serde_json::from_slice(&output.stdout).unwrap();
    let ide = Session::start(&vars).await;
    let tool = structured(&ide.call("maestra_health", json!({})).await).clone();

    let (mut cli_shape, mut tool_shape) = (Vec::new(), Vec::new());
    shape(&cli, "", &mut cli_shape);
    shape(&tool, "", &mut tool_shape);
    assert_eq!(cli_shape, tool_shape, "CLI: {cli}\nMCP: {tool}");
    for report in [&cli, &tool] {
        assert_eq!(report["any_healthy"], true, "{report}");
        assert_eq!(report["fallback_enabled"], false, "{report}");
        assert_eq!(report["cloud"]["status"], "unreachable", "{report}");
    }
}

#[tokio::test]
async fn optional_arguments_are_plain_types_that_every_client_can_send() {
    let local = spawn_app().await;
    let ide = Session::start(&[("MAESTRA_LOCAL_URL", local.address.as_str())]).await;
    for tool in ide.client.list_all_tools().await.unwrap() {
        let schema = Value::Object(tool.input_schema.as_ref().clone());
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (name, property) in schema["properties"].as_object().unwrap() {
            assert!(
                property["type"].is_string(),
                "{}.{name}: {property}",
                tool.name
            );
            if ["after_seq", "limit"].contains(&name.as_str()) {
                assert_eq!(property["type"], "integer", "{}.{name}", tool.name);
                assert!(!required.contains(&name.as_str()), "{name} is optional");
            }
        }
    }
    // An integer is sent as one, and leaving it out still works.
    local.say("ana", "cli", Some("conv_h"), "one").await;
    local.say("ana", "cli", Some("conv_h"), "two").await;
    let page = ide
        .call(
            "maestra_history",
            json!({"conversation_id": "conv_h", "user_id": "ana", "after_seq": 2, "limit": 1}),
        )
        .await;
    let page = structured(&page);
    assert_eq!(page["messages"][0]["seq"], 3, "{page}");
    let all = ide
        .call(
            "maestra_history",
            json!({"conversation_id": "conv_h", "user_id": "ana"}),
        )
        .await;
    assert_eq!(structured(&all)["messages"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn without_user_the_tools_use_the_accounts_name_from_the_system() {
    // maestra_command clears the environment: no USER, no LOGNAME, no MAESTRA_USER_ID.
    let local = spawn_app().await;
    let ide = Session::start(&[("MAESTRA_LOCAL_URL", local.address.as_str())]).await;
    let asked = ide.call("maestra_ask", json!({"message": "Hello"})).await;
    let body = structured(&asked).clone();
    let account = whoami::fallible::username().unwrap();
    let conversation = body["conversation_id"].as_str().unwrap();
    let stored = local.messages(&account, conversation).await;
    assert_eq!(stored.len(), 2, "stored under {account}");

    let home = tempfile::tempdir().unwrap();
    let output = maestra(
        home.path(),
        &[("MAESTRA_LOCAL_URL", local.address.as_str())],
        &["ask", "--json", "Hello"],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    let stored = local
        .messages(&account, body["conversation_id"].as_str().unwrap())
        .await;
    assert_eq!(stored.len(), 2);
}
