//! Messages survive what happens to servers under load: SIGKILL in both modes, Postgres
//! lost and found again. Every acknowledged message is stored exactly once, in order.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::fake_provider::{FakeProvider, Step};
use crate::helpers::{
    ServerProcess, TEST_API_KEY, TcpProxy, all_messages, database_url, maestra_command,
    priced_provider_vars, spawn_cloud_app_at,
};

const CONVERSATIONS: [&str; 2] = ["conv_shared_0", "conv_shared_1"];

/// Four clients posting to two shared conversations, each message text unique.
struct Load {
    /// (conversation, text) of every message answered with 200.
    acknowledged: Arc<Mutex<Vec<(String, String)>>>,
    failures: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `keep_going`: go on after a failed request (an outage) instead of stopping (a crash).
    fn start(base: &str, key: Option<&str>, keep_going: bool) -> Load {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let clients = (0..4)
            .map(|c| {
                let (client, acknowledged, failures, stop) =
                    (client.clone(), acknowledged.clone(), failures.clone(), stop.clone());
                let url = format!("{base}/api/maestra/core");
                let key = key.map(str::to_owned);
                let conversation = CONVERSATIONS[c % 2].to_owned();
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let text = format!("client{c}-{i}");
                        let body = json!({"user_id": "ana", "surface_id": format!("surface{c}"), "conversation_id": conversation, "message": text});
                        let mut request = client.post(&url).json(&body);
                        if let Some(key) = &key {
                            request = request.header("X-API-Key", key);
                        }
                        match request.send().await {
                            Ok(r) if r.status() == 200 => {
                                acknowledged.lock().unwrap().push((conversation.clone(), text))
                            }
                            _ if keep_going => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            _ => return,
                        }
                    }
                })
            })
            .collect();
        Load {
            acknowledged,
            failures,
            stop,
            clients,
        }
    }

    fn acknowledged_count(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    async fn until_acknowledged(&self, count: usize) {
        while self.acknowledged_count() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(self) -> (Vec<(String, String)>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.unwrap();
        }
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        (acknowledged, self.failures.load(Ordering::Relaxed))
    }
}

/// Every acknowledged message is there exactly once; seqs run 1, 2, 3, …; each client's
/// messages keep the order it sent them in.
async fn assert_all_kept(base: &str, key: Option<&str>, acknowledged: &[(String, String)]) {
    for conversation in CONVERSATIONS {
        let messages = all_messages(base, key, conversation).await;
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
        for (_, text) in acknowledged.iter().filter(|(c, _)| c == conversation) {
            assert!(
                unique.contains(text.as_str()),
                "{conversation}: acknowledged {text} is lost"
            );
        }
        let mut last_index: HashMap<&str, u64> = HashMap::new();
        for text in texts {
            let (client, index) = text.split_once('-').unwrap();
            let index: u64 = index.parse().unwrap();
            if let Some(previous) = last_index.insert(client, index) {
                assert!(
                    index > previous,
                    "{conversation}: {text} stored out of order"
                );
            }
        }
    }
}

/// A local server on `data` killed with SIGKILL under load; the messages it acknowledged.
async fn local_crash_under_load(data: &std::path::Path) -> Vec<(String, String)> {
    let mut server = ServerProcess::start(data, &[]).await;
    let load = Load::start(&server.url(""), None, false);
    load.until_acknowledged(200).await;
    server.kill_hard();
    load.finish().await.0
}

#[tokio::test]
async fn local_sigkill_under_load_loses_no_acknowledged_message() {
    let data = tempfile::tempdir().unwrap();
    let acknowledged = local_crash_under_load(data.path()).await;

    let server = ServerProcess::start(data.path(), &[]).await;
    assert_all_kept(&server.url(""), None, &acknowledged).await;
    // The restarted server appends where each conversation ended.
    let reply: Value = reqwest::Client::new()
        .post(server.url("/api/maestra/core"))
        .json(&json!({"user_id": "ana", "surface_id": "cli", "conversation_id": CONVERSATIONS[0], "message": "after the crash"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let count = all_messages(&server.url(""), None, CONVERSATIONS[0])
        .await
        .len() as i64;
    assert_eq!(reply["seq"], count);
}

#[tokio::test]
async fn local_crash_that_also_loses_unflushed_file_writes_loses_no_acknowledged_message() {
    let data = tempfile::tempdir().unwrap();
    let acknowledged = local_crash_under_load(data.path()).await;

    // The conversation files are never flushed on their own while the journal still holds
    // their writes (a few hundred turns are far from filling a segment): after a power cut
    // they may be gone entirely. The journal brings them back.
    for conversation in CONVERSATIONS {
        std::fs::remove_file(
            data.path()
                .join(format!("conversations/{conversation}.json")),
        )
        .unwrap();
    }
    let server = ServerProcess::start(data.path(), &[]).await;
    assert_all_kept(&server.url(""), None, &acknowledged).await;
}

#[tokio::test]
async fn local_sigkill_under_load_leaves_every_stored_reply_exactly_one_ledger_line() {
    let provider = FakeProvider::start(Step::Reply("Priced.".to_owned())).await;
    let vars = priced_provider_vars(&provider);
    let data = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let mut server = ServerProcess::start(data.path(), &vars).await;
        let load = Load::start(&server.url(""), None, false);
        load.until_acknowledged(100).await;
        server.kill_hard();
        load.finish().await;
    }

    let server = ServerProcess::start(data.path(), &vars).await;
    let mut replies = HashMap::new();
    for conversation in CONVERSATIONS {
        for message in all_messages(&server.url(""), None, conversation).await {
            if message["role"] == "assistant" {
                let at: DateTime<Utc> = message["created_at"].as_str().unwrap().parse().unwrap();
                let cost = message["usage"]["cost_usd"].as_f64().unwrap();
                assert!(cost > 0.0, "{message}");
                replies.insert((conversation.to_owned(), at), cost);
            }
        }
    }
    let ledger = std::fs::read_to_string(data.path().join("maestra_metrics.jsonl")).unwrap();
    let mut priced = HashMap::new();
    for line in ledger.lines() {
        let line: Value = serde_json::from_str(line).expect("every ledger line is whole JSON");
        let reply = (
            line["conversation_id"].as_str().unwrap().to_owned(),
            line["ts"]
                .as_str()
                .unwrap()
                .parse::<DateTime<Utc>>()
                .unwrap(),
        );
        assert!(
            replies.contains_key(&reply),
            "a ledger line for a reply that is not stored: {line}"
        );
        assert!(
            priced
                .insert(reply, line["cost_usd"].as_f64().unwrap())
                .is_none(),
            "two ledger lines for one reply: {line}"
        );
    }
    assert!(replies.len() >= 300, "{} replies stored", replies.len());
    let unpriced: Vec<_> = replies
        .keys()
        .filter(|r| !priced.contains_key(*r))
        .collect();
    assert!(
        unpriced.is_empty(),
        "{} of {} stored replies have no ledger line, e.g. {:?}",
        unpriced.len(),
        replies.len(),
        unpriced.first()
    );
    assert_eq!(priced, replies, "each line's cost is its reply's");

    let usage = maestra_command(data.path(), &[])
        .args(["usage", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(usage.status.success());
    let usage: Value = serde_json::from_slice(&usage.stdout).unwrap();
    assert_eq!(usage["total"]["requests"], replies.len(), "{usage}");
    let total: f64 = replies.values().sum();
    let reported = usage["total"]["cost_usd"].as_f64().unwrap();
    assert!(
        (reported - total).abs() < 1e-6,
        "usage says {reported}, the replies cost {total}"
    );
}

/// A free port right now, for a server that takes a fixed port (cloud mode).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[sqlx::test(migrations = false)]
async fn cloud_sigkill_under_load_loses_no_acknowledged_message(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let url = database_url(&db);
    let port = free_port().to_string();
    let vars = [
        ("MAESTRA_MODE", "cloud"),
        ("MAESTRA_HOST", "127.0.0.1"),
        ("MAESTRA_PORT", port.as_str()),
        ("DATABASE_URL", url.as_str()),
        ("MAESTRA_API_KEY", TEST_API_KEY),
        ("MAESTRA_RATE_LIMIT_REQUESTS", "100000"),
    ];
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_at_port(data.path(), &vars).await;
    let load = Load::start(&server.url(""), Some(TEST_API_KEY), false);
    load.until_acknowledged(200).await;
    server.kill_hard();
    let (acknowledged, _) = load.finish().await;

    let server = ServerProcess::start_at_port(data.path(), &vars).await;
    assert_all_kept(&server.url(""), Some(TEST_API_KEY), &acknowledged).await;
}

#[sqlx::test(migrations = false)]
async fn losing_postgres_under_load_answers_503_then_recovers_with_nothing_lost(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let direct = database_url(&db);
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let proxied = direct.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    let app = spawn_cloud_app_at(
        &proxied,
        &direct,
        &[("MAESTRA_RATE_LIMIT_REQUESTS", "100000")],
    )
    .await;
    let base = app.app.address.clone();

    let load = Load::start(&base, Some(&app.api_key), true);
    load.until_acknowledged(50).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let during_outage = load.acknowledged_count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        load.acknowledged_count(),
        during_outage,
        "nothing is acknowledged without Postgres"
    );
    proxy.restore();
    load.until_acknowledged(during_outage + 50).await;
    let (acknowledged, failures) = load.finish().await;
    assert!(failures > 0, "the outage was seen as failed requests");
    assert_all_kept(&base, Some(&app.api_key), &acknowledged).await;
}
