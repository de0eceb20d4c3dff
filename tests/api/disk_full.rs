//! A full disk, for real: the data folder on a small tmpfs the test mounts and fills. Appends
//! get a clear 507, nothing acknowledged is lost, no file is left with a torn line, `/health`
//! says why it is degraded, and the server serves again as soon as space is freed, without a
//! restart; after a crash (SIGKILL) and a restart every acknowledged message is there.
//!
//! Mounting needs root. CI runs as root, so a failure to mount fails the test loudly instead
//! of skipping it (run `cargo test --test api disk_full` as root).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::fake_provider::{FakeProvider, Step};
use crate::helpers::{
    ServerProcess, TEST_LLM_API_KEY, TEST_MODEL, TEST_PRICE_INPUT, TEST_PRICE_OUTPUT, all_messages,
};

/// A tmpfs of a given size on a fresh folder, unmounted when dropped.
struct SmallDisk {
    mount: PathBuf,
    _parent: TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let parent = tempfile::tempdir().unwrap();
        let mount = parent.path().join("disk");
        fs::create_dir(&mount).unwrap();
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&mount)
            .output()
            .expect("cannot run `mount`");
        assert!(
            output.status.success(),
            "this test mounts a small tmpfs and needs root to do so (CI runs as root); \
             mount said: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        SmallDisk {
            mount,
            _parent: parent,
        }
    }

    fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn is_full(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::StorageFull
}

/// Writes a file until the disk has no room left; returns its path.
fn fill(disk: &Path) -> PathBuf {
    let path = disk.join("filler");
    let mut file = File::create(&path).unwrap();
    let chunk = vec![0xab; 64 << 10];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if is_full(&e) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    // Nothing more fits: not even one byte in a new file.
    let probe = File::create(disk.join("probe")).and_then(|mut f| f.write_all(b"x"));
    assert!(
        probe.as_ref().is_err_and(is_full),
        "the disk is full: {probe:?}"
    );
    let _ = fs::remove_file(disk.join("probe"));
    path
}

/// Every line of every conversation file and of the ledger is whole JSON.
fn assert_no_torn_line(data: &Path) {
    let mut files: Vec<PathBuf> = fs::read_dir(data.join("conversations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.push(data.join("maestra_metrics.jsonl"));
    for path in files {
        let text = fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends with a torn line",
            path.display()
        );
        for line in text.lines() {
            assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "{}: a line that is not JSON: {line:?}",
                path.display()
            );
        }
    }
    let leftovers: Vec<_> = fs::read_dir(data.join("conversations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".json"))
        .collect();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
}

async fn post(server: &ServerProcess, conversation: &str, text: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url("/api/maestra/core"))
        .json(&json!({"user_id": "ana", "surface_id": "cli", "conversation_id": conversation, "message": text}))
        .send()
        .await
        .unwrap()
}

/// A 507 with the JSON error envelope, saying that the disk is full.
async fn assert_disk_full(response: reqwest::Response) {
    assert_eq!(response.status(), 507);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
    assert_eq!(body["error"]["request_id"], request_id.as_str());
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("disk") && message.contains("full"),
        "{message}"
    );
}

/// One acknowledged turn: the user's text and the reply's id, in their conversation.
struct Acknowledged {
    conversation: String,
    text: String,
    reply_id: String,
}

async fn acknowledged(response: reqwest::Response, conversation: &str, text: &str) -> Acknowledged {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    Acknowledged {
        conversation: conversation.to_owned(),
        text: text.to_owned(),
        reply_id: body["message_id"].as_str().unwrap().to_owned(),
    }
}

async fn a_full_disk_loses_nothing_and_is_served_again_once_space_is_freed(sparse_journal: bool) {
    let disk = SmallDisk::mount("12m");
    let data = disk.path().join("data");
    if sparse_journal {
        // Segments that are files of the right size but hold no blocks: writing a record then
        // needs new blocks, as on a copy-on-write filesystem (btrfs, ZFS, APFS with snapshots),
        // so the journal's own writes meet the full disk too.
        let journal = data.join("journal");
        fs::create_dir_all(&journal).unwrap();
        for index in 0..2 {
            File::create(journal.join(format!("segment-{index}")))
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
        }
    }
    let mut server = ServerProcess::start(&data, &[]).await;
    let mut kept = Vec::new();
    for i in 0..3 {
        let text = format!("before the disk filled {i}");
        kept.push(acknowledged(post(&server, "conv_full", &text).await, "conv_full", &text).await);
    }

    let filler = fill(disk.path());

    // A new conversation needs room: refused, clearly.
    assert_disk_full(post(&server, "conv_new", "hello").await).await;
    // An existing one may still take a line or two in its last block; then refused too.
    let mut refused = 0;
    for i in 0..50 {
        let text = format!("while the disk is full {i}");
        let response = post(&server, "conv_full", &text).await;
        if response.status() == 200 {
            kept.push(acknowledged(response, "conv_full", &text).await);
            continue;
        }
        assert_disk_full(response).await;
        refused += 1;
        if refused == 3 {
            break;
        }
    }
    assert_eq!(refused, 3, "appends are refused while the disk is full");

    let health = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["storage"], "full", "{health}");
    assert!(
        health["reason"].as_str().unwrap().contains("full"),
        "{health}"
    );
    assert_no_torn_line(&data);

    // Space is freed: healthy and served again, without a restart.
    fs::remove_file(filler).unwrap();
    let health = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["storage"], "ok", "{health}");
    for conversation in ["conv_full", "conv_new"] {
        let text = format!("after space was freed, in {conversation}");
        kept.push(
            acknowledged(
                post(&server, conversation, &text).await,
                conversation,
                &text,
            )
            .await,
        );
    }

    // A crash, then a restart: every acknowledged message is there, in order.
    server.kill_hard();
    let server = ServerProcess::start(&data, &[]).await;
    assert_no_torn_line(&data);
    for conversation in ["conv_full", "conv_new"] {
        let messages = all_messages(&server.url(""), None, conversation).await;
        let seqs: Vec<i64> = messages
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let mut at = 0;
        for turn in kept.iter().filter(|t| t.conversation == conversation) {
            let user = messages[at..]
                .iter()
                .position(|m| m["role"] == "user" && m["content"] == turn.text.as_str())
                .unwrap_or_else(|| panic!("{:?} is lost: {messages:#?}", turn.text));
            let reply = messages[at + user..]
                .iter()
                .position(|m| m["id"] == turn.reply_id.as_str())
                .unwrap_or_else(|| panic!("the reply to {:?} is lost", turn.text));
            at += user + reply + 1;
        }
    }
}

#[tokio::test]
async fn a_full_disk_is_a_clear_507_loses_nothing_and_passes_once_space_is_freed() {
    a_full_disk_loses_nothing_and_is_served_again_once_space_is_freed(false).await;
}

#[tokio::test]
async fn a_full_disk_under_the_journal_itself_refuses_appends_without_stopping_the_store() {
    a_full_disk_loses_nothing_and_is_served_again_once_space_is_freed(true).await;
}

#[tokio::test]
async fn a_disk_that_fills_while_the_model_answers_keeps_the_message_and_a_retry_stores_the_reply()
{
    // A long reply (it needs new blocks), a second after the request reaches the provider.
    let reply = "word ".repeat(4000);
    let provider = FakeProvider::start(Step::Delay(
        std::time::Duration::from_secs(1),
        Box::new(Step::Reply(reply.clone())),
    ))
    .await;
    let disk = SmallDisk::mount("12m");
    let data = disk.path().join("data");
    let server = ServerProcess::start(
        &data,
        &[
            ("MAESTRA_LLM_BASE_URL", provider.base_url.as_str()),
            ("MAESTRA_LLM_MODEL", TEST_MODEL),
            ("MAESTRA_LLM_API_KEY", TEST_LLM_API_KEY),
            ("MAESTRA_LLM_PRICE_INPUT", TEST_PRICE_INPUT),
            ("MAESTRA_LLM_PRICE_OUTPUT", TEST_PRICE_OUTPUT),
        ],
    )
    .await;
    let body = json!({"user_id": "ana", "surface_id": "cli", "conversation_id": "conv_mid", "message": "Hello"});
    let send = || {
        reqwest::Client::new()
            .post(server.url("/api/maestra/core"))
            .header("Idempotency-Key", "retry-me")
            .json(&body)
            .send()
    };
    let turn = tokio::spawn(send());
    // The user's message is stored before the provider is asked: fill the disk meanwhile.
    while provider.received().is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let filler = fill(disk.path());
    let response = turn.await.unwrap().unwrap();
    assert_eq!(response.status(), 507);
    let error: Value = response.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("full"), "{message}");
    assert!(
        message.contains("your message was stored (conversation conv_mid, seq 1)"),
        "{message}"
    );
    assert_no_torn_line(&data);

    // Space freed: the retry (same key) asks the model again and stores the reply; the
    // user's message is not stored twice.
    fs::remove_file(filler).unwrap();
    let retried = send().await.unwrap();
    assert_eq!(retried.status(), 200);
    let messages = all_messages(&server.url(""), None, "conv_mid").await;
    let roles: Vec<_> = messages.iter().map(|m| m["role"].clone()).collect();
    assert_eq!(roles, [json!("user"), json!("assistant")]);
    assert!(
        messages[1]["content"] == reply.as_str(),
        "the reply is stored whole"
    );
    assert_no_torn_line(&data);
}
