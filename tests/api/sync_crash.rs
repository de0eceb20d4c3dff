//! Sync survives SIGKILL: the real local and cloud binaries, one of them killed at a seeded
//! random moment while a round pushes and pulls, then started again; at the end both sides
//! hold the same messages in the same order, each once, none lost, each reply priced once.
//!
//! `MAESTRA_SYNC_CRASH_RUNS` (default 50, half of them killing each side) and
//! `MAESTRA_SYNC_CRASH_SEED` set the length and the seed: the README's long run uses 1000.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{ServerProcess, TEST_API_KEY, database_url};
use crate::sync::{assert_same, link, listing};

/// xorshift64*: enough randomness for choosing moments, and the same for the same seed.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const CONVERSATIONS: [&str; 4] = ["conv_both", "conv_also", "conv_local", "conv_cloud"];

struct Sides {
    local_dir: tempfile::TempDir,
    cloud_dir: tempfile::TempDir,
    cloud_vars: Vec<(String, String)>,
    local: ServerProcess,
    cloud: ServerProcess,
    client: reqwest::Client,
    /// What each conversation must hold (content), and the replies each side made.
    expected: BTreeMap<String, BTreeSet<String>>,
    local_replies: usize,
    cloud_replies: usize,
}

impl Sides {
    fn local_url(&self) -> String {
        self.local.url("")
    }

    fn cloud_url(&self) -> String {
        self.cloud.url("")
    }

    async fn start_local(dir: &std::path::Path) -> ServerProcess {
        ServerProcess::start(dir, &[("MAESTRA_SYNC_INTERVAL", "1")]).await
    }

    async fn start_cloud(dir: &std::path::Path, vars: &[(String, String)]) -> ServerProcess {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ServerProcess::start_at_port(dir, &vars).await
    }

    /// One turn on either side; its texts join what the conversation must hold.
    async fn turn(&mut self, on_cloud: bool, conversation: &str, text: &str) {
        let mut request = self
            .client
            .post(if on_cloud {
                self.cloud.url("/api/maestra/core")
            } else {
                self.local.url("/api/maestra/core")
            })
            .json(
                &json!({"user_id": "ana", "surface_id": if on_cloud { "mobile" } else { "cli" },
                          "conversation_id": conversation, "message": text}),
            );
        if on_cloud {
            request = request.header("X-API-Key", TEST_API_KEY);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{text}");
        let reply: Value = response.json().await.unwrap();
        let expected = self.expected.entry(conversation.to_owned()).or_default();
        expected.insert(text.to_owned());
        expected.insert(reply["reply"].as_str().unwrap().to_owned());
        if on_cloud {
            self.cloud_replies += 1;
        } else {
            self.local_replies += 1;
        }
    }

    async fn delete(&mut self, on_cloud: bool, conversation: &str) {
        let path = format!("/api/maestra/conversations/{conversation}?user_id=ana");
        let mut request = self.client.delete(if on_cloud {
            self.cloud.url(&path)
        } else {
            self.local.url(&path)
        });
        if on_cloud {
            request = request.header("X-API-Key", TEST_API_KEY);
        }
        let status = request.send().await.unwrap().status();
        assert!(status == 200 || status == 404, "delete: {status}");
        self.expected.remove(conversation);
    }
}

#[sqlx::test(migrations = false)]
async fn sync_survives_sigkill_of_either_side_at_random_moments(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let runs = env_number("MAESTRA_SYNC_CRASH_RUNS", 50);
    let seed = env_number("MAESTRA_SYNC_CRASH_SEED", 8825);
    let mut random = Seeded(seed | 1);
    println!("{runs} runs, seed {seed}");

    let cloud_port = free_port().to_string();
    let cloud_vars: Vec<(String, String)> = [
        ("MAESTRA_MODE", "cloud"),
        ("MAESTRA_HOST", "127.0.0.1"),
        ("MAESTRA_PORT", cloud_port.as_str()),
        ("DATABASE_URL", database_url(&db).as_str()),
        ("MAESTRA_API_KEY", TEST_API_KEY),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let cloud_dir = tempfile::tempdir().unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let cloud = Sides::start_cloud(cloud_dir.path(), &cloud_vars).await;
    link(local_dir.path(), &cloud.url(""), TEST_API_KEY);
    let local = Sides::start_local(local_dir.path()).await;
    let mut sides = Sides {
        local_dir,
        cloud_dir,
        cloud_vars,
        local,
        cloud,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        expected: BTreeMap::new(),
        local_replies: 0,
        cloud_replies: 0,
    };

    let mut interrupted = 0;
    for run in 0..runs {
        // Some turns on each side (so that every round has work both ways), now and then a
        // deletion.
        for i in 0..1 + random.below(3) {
            let conversation = CONVERSATIONS[random.below(3) as usize];
            sides
                .turn(false, conversation, &format!("run {run} local {i}"))
                .await;
            let conversation = CONVERSATIONS[[0, 1, 3][random.below(3) as usize]];
            sides
                .turn(true, conversation, &format!("run {run} cloud {i}"))
                .await;
        }
        if random.below(8) == 0 {
            let conversation = CONVERSATIONS[random.below(4) as usize];
            sides.delete(random.below(2) == 0, conversation).await;
        }
        // A round under way, then SIGKILL a few milliseconds into it.
        let now = sides
            .client
            .post(sides.local.url("/api/maestra/sync/now"))
            .send();
        let round = tokio::spawn(now);
        tokio::time::sleep(Duration::from_micros(random.below(120_000))).await;
        if run % 2 == 0 {
            sides.local.kill_hard();
        } else {
            sides.cloud.kill_hard();
        }
        // Whether the kill cut the round short (or came after it was done).
        let completed = match round.await.unwrap() {
            Ok(response) => response
                .json::<Value>()
                .await
                .is_ok_and(|status| status["state"] == "ok"),
            Err(_) => false,
        };
        interrupted += usize::from(!completed);
        if run % 2 == 0 {
            sides.local = Sides::start_local(sides.local_dir.path()).await;
        } else {
            sides.cloud = Sides::start_cloud(sides.cloud_dir.path(), &sides.cloud_vars).await;
        }
    }
    println!("{interrupted} of {runs} rounds were cut short by the kill");
    assert!(
        interrupted * 4 >= runs as usize,
        "the kills must land inside rounds"
    );

    // Both up again: once synced, both sides hold the same, and everything acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status: Value = sides
            .client
            .post(sides.local.url("/api/maestra/sync/now"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["state"] == "ok" && status["pending"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never synced: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (local_url, cloud_url) = (sides.local_url(), sides.cloud_url());
    let both = assert_same(&local_url, &cloud_url, TEST_API_KEY, "ana").await;
    for (conversation, expected) in &sides.expected {
        let held: BTreeSet<String> = listing(&sides.client, &local_url, None, "ana", conversation)
            .await
            .into_iter()
            .map(|(_, content)| content)
            .collect();
        let lost: Vec<&String> = expected.difference(&held).collect();
        assert!(lost.is_empty(), "{conversation}: lost {lost:?}");
    }
    let held: usize = both.values().map(Vec::len).sum();
    let expected: usize = sides.expected.values().map(BTreeSet::len).sum();
    assert!(held >= expected, "{held} held, {expected} expected");

    // Each reply priced once, where it was made.
    let ledger = std::fs::read_to_string(sides.local_dir.path().join("maestra_metrics.jsonl"))
        .unwrap_or_default();
    assert_eq!(ledger.lines().count(), sides.local_replies);
    let pool = sqlx::PgPool::connect(&database_url(&db)).await.unwrap();
    let usage: i64 = sqlx::query_scalar("SELECT count(*) FROM usage")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(usage as usize, sides.cloud_replies);
}
