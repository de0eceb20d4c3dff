//! The real binary, as a user runs it: crash safety, port choice, one server per folder,
//! start-up errors, graceful stop.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{ServerProcess, maestra_command};

/// All messages of a conversation, following pagination.
async fn all_messages(
    client: &reqwest::Client,
    server: &ServerProcess,
    conversation: &str,
) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut after = 0;
    loop {
        let url = server.url(&format!(
            "/api/maestra/conversations/{conversation}?user_id=ana&after_seq={after}&limit=1000"
        ));
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        messages.extend(page["messages"].as_array().unwrap().iter().cloned());
        match page["next_after_seq"].as_i64() {
            Some(next) => after = next,
            None => return messages,
        }
    }
}

#[tokio::test]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path(), &[]).await;
    let client = reqwest::Client::new();
    let conversations = ["conv_shared_0", "conv_shared_1"];
    // (conversation, text) of every message the server acknowledged with a 200.
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));

    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (client, url, acknowledged) = (client.clone(), server.url("/api/maestra/core"), Arc::clone(&acknowledged));
            let conversation = conversations[c % 2].to_owned();
            tokio::spawn(async move {
                for i in 0.. {
                    let text = format!("client{c}-{i}");
                    let body = json!({"user_id": "ana", "surface_id": format!("surface{c}"), "conversation_id": conversation, "message": text});
                    match client.post(&url).json(&body).send().await {
                        Ok(r) if r.status() == 200 => acknowledged.lock().unwrap().push((conversation.clone(), text)),
                        _ => return,
                    }
                }
            })
        })
        .collect();

    // Let the load run, then pull the plug in the middle of it.
    while acknowledged.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill_hard();
    for handle in clients {
        handle.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    let server = ServerProcess::start(data.path(), &[]).await;
    let mut stored_users = 0;
    for conversation in conversations {
        let messages = all_messages(&client, &server, conversation).await;
        let seqs: Vec<i64> = messages
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "{conversation}: seqs"
        );

        let texts: Vec<&str> = messages
            .iter()
            .filter(|m| m["role"] == "user")
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        let unique: HashSet<&str> = texts.iter().copied().collect();
        assert_eq!(
            unique.len(),
            texts.len(),
            "{conversation}: a message is stored twice"
        );
        stored_users += texts.len();

        for (_, text) in acknowledged.iter().filter(|(c, _)| c == conversation) {
            assert!(
                unique.contains(text.as_str()),
                "{conversation}: acknowledged {text} is lost"
            );
        }
        // Each client's messages keep the order it sent them in.
        let mut last_index: HashMap<&str, u64> = HashMap::new();
        for text in texts {
            let (client_name, index) = text.split_once('-').unwrap();
            let index: u64 = index.parse().unwrap();
            if let Some(previous) = last_index.insert(client_name, index) {
                assert!(
                    index > previous,
                    "{conversation}: {text} stored out of order"
                );
            }
        }
    }
    assert!(stored_users >= acknowledged.len());

    // The restarted server goes on appending where the conversation ended.
    let reply: Value = client
        .post(server.url("/api/maestra/core"))
        .json(&json!({"user_id": "ana", "surface_id": "cli", "conversation_id": "conv_shared_0", "message": "after the crash"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let before = all_messages(&client, &server, "conv_shared_0").await.len() as i64;
    assert_eq!(reply["seq"], before);
}

/// `count` consecutive ports that are free right now.
fn free_port_run(count: u16) -> u16 {
    for _ in 0..200 {
        let base = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if base > u16::MAX - count {
            continue;
        }
        if (base..base + count).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no run of {count} free ports");
}

#[tokio::test]
async fn with_the_first_port_taken_it_serves_on_the_next_and_writes_the_port_file() {
    let base = free_port_run(5);
    let _taken = TcpListener::bind(("127.0.0.1", base)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let range = format!("{base}-{}", base + 4);
    let server = ServerProcess::start(
        data.path(),
        &[("MAESTRA_PORT", ""), ("MAESTRA_PORT_RANGE", &range)],
    )
    .await;
    assert_eq!(server.port, base + 1);
    let written = std::fs::read_to_string(data.path().join("maestra.port")).unwrap();
    assert_eq!(written.trim(), (base + 1).to_string());
}

#[tokio::test]
async fn with_every_port_taken_it_exits_1_with_one_clear_line() {
    let base = free_port_run(5);
    let _taken: Vec<_> = (base..base + 5)
        .map(|p| TcpListener::bind(("127.0.0.1", p)).unwrap())
        .collect();
    let data = tempfile::tempdir().unwrap();
    let range = format!("{base}-{}", base + 4);
    let output = maestra_command(
        data.path(),
        &[("MAESTRA_PORT", ""), ("MAESTRA_PORT_RANGE", &range)],
    )
    .stderr(std::process::Stdio::piped())
    .arg("serve")
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("maestra: every port from"), "{stderr}");
    assert!(last.contains("in use"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn a_second_server_on_the_same_data_folder_exits_with_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(data.path(), &[]).await;
    let output = maestra_command(data.path(), &[])
        .stderr(std::process::Stdio::piped())
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("another maestra server is already using"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&first.port.to_string()),
        "names the running server's port: {stderr}"
    );
    // The first one is unharmed.
    let health = reqwest::get(first.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn bad_configuration_stops_start_up_naming_the_variable() {
    let data = tempfile::tempdir().unwrap();
    for (variable, value) in [
        ("MAESTRA_MODE", "hybrid"),
        ("MAESTRA_PORT", "99999"),
        ("MAESTRA_HOST", "nowhere"),
    ] {
        let output = maestra_command(data.path(), &[(variable, value)])
            .stderr(std::process::Stdio::piped())
            .arg("serve")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{variable}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("maestra: {variable}: ")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let data = tempfile::tempdir().unwrap();
    let status = maestra_command(data.path(), &[])
        .arg("no-such-command")
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let status = maestra_command(data.path(), &[])
        .arg("--help")
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly_and_restarting_keeps_everything() {
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path(), &[]).await;
    let client = reqwest::Client::new();
    for i in 0..3 {
        let response = client
            .post(server.url("/api/maestra/core"))
            .json(&json!({"user_id": "ana", "surface_id": "cli", "conversation_id": "conv_keep", "message": format!("m{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    server.signal("TERM");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !data.path().join("maestra.port").exists(),
        "the port file is removed on a clean stop"
    );

    let server = ServerProcess::start(data.path(), &[]).await;
    let messages = all_messages(&client, &server, "conv_keep").await;
    assert_eq!(messages.len(), 6);
}
