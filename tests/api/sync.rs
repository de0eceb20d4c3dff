//! Sync between a local server and a cloud server (on its own fresh database), both over real
//! HTTP on loopback; the cloud behind a TCP proxy the test can cut.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::clients::{maestra, text};
use crate::helpers::{CloudApp, TcpProxy, TestApp, spawn_app_with, spawn_cloud_app};
use maestra::domain::UserId;
use maestra::sync::CloudLink;

/// A conversation as a server lists it: (message id, content), in the order it shows them.
pub type Listing = Vec<(String, String)>;

/// A local server syncing with `cloud_url` for `ana`, every second.
pub async fn linked_local(cloud_url: &str, key: &str, vars: &[(&str, &str)]) -> TestApp {
    let mut all = vec![("MAESTRA_SYNC_INTERVAL", "1")];
    all.extend_from_slice(vars);
    let local = spawn_app_with(&all).await;
    link(local.data_dir.path(), cloud_url, key);
    local
}

pub fn link(data_dir: &std::path::Path, cloud_url: &str, key: &str) {
    CloudLink {
        url: cloud_url.parse().unwrap(),
        api_key: secrecy::SecretString::from(key.to_owned()),
        users: vec![UserId::parse("ana").unwrap()],
    }
    .save(data_dir)
    .unwrap();
}

/// A local server linked to the cloud through a proxy the test can cut.
async fn linked_through_proxy(cloud: &CloudApp, vars: &[(&str, &str)]) -> (TcpProxy, TestApp) {
    let proxy = TcpProxy::start(cloud.app.address.trim_start_matches("http://")).await;
    let through_proxy = format!("http://127.0.0.1:{}", proxy.port);
    let local = linked_local(&through_proxy, &cloud.api_key, vars).await;
    (proxy, local)
}

/// Asks the local server for a round now; its status after it.
pub async fn sync_now(local: &TestApp) -> Value {
    let response = local
        .client
        .post(format!("{}/api/maestra/sync/now", local.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Syncs until a round completes (the cloud may need a moment after coming back).
pub async fn synced(local: &TestApp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = sync_now(local).await;
        if status["state"] == "ok" && status["pending"] == 0 {
            return status;
        }
        assert!(Instant::now() < deadline, "sync never completed: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every message of a user's conversation, following the pages, in the order listed.
pub async fn listing(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    user: &str,
    conversation: &str,
) -> Listing {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let mut request = client.get(format!(
            "{base}/api/maestra/conversations/{conversation}?user_id={user}&after_seq={after}&limit=1000"
        ));
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        let response = request.send().await.unwrap();
        if response.status() == 404 {
            return all;
        }
        assert_eq!(response.status(), 200, "reading {conversation}");
        let page: Value = response.json().await.unwrap();
        for m in page["messages"].as_array().unwrap() {
            all.push((
                m["id"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_after_seq"].as_i64() {
            Some(next) => after = next,
            None => return all,
        }
    }
}

/// The user's conversation ids on a server.
pub async fn conversations(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    user: &str,
) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut offset = 0;
    loop {
        let mut request = client.get(format!(
            "{base}/api/maestra/conversations?user_id={user}&limit=100&offset={offset}"
        ));
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        let page: Value = request.send().await.unwrap().json().await.unwrap();
        for c in page["conversations"].as_array().unwrap() {
            ids.insert(c["conversation_id"].as_str().unwrap().to_owned());
        }
        match page["next_offset"].as_u64() {
            Some(next) => offset = next,
            None => return ids,
        }
    }
}

/// Both sides hold the same conversations, each with the same messages in the same order,
/// none twice; returns them.
pub async fn assert_same(
    local_base: &str,
    cloud_base: &str,
    key: &str,
    user: &str,
) -> BTreeMap<String, Listing> {
    let client = reqwest::Client::new();
    let here = conversations(&client, local_base, None, user).await;
    let there = conversations(&client, cloud_base, Some(key), user).await;
    assert_eq!(here, there, "the same conversations on both sides");
    let mut all = BTreeMap::new();
    for conversation in here {
        let local = listing(&client, local_base, None, user, &conversation).await;
        let cloud = listing(&client, cloud_base, Some(key), user, &conversation).await;
        assert_eq!(
            local, cloud,
            "{conversation}: the same messages in the same order"
        );
        let ids: BTreeSet<&String> = local.iter().map(|(id, _)| id).collect();
        assert_eq!(ids.len(), local.len(), "{conversation}: a message twice");
        all.insert(conversation, local);
    }
    all
}

async fn say(base: &str, key: Option<&str>, conversation: &str, text: &str) -> Value {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/api/maestra/core"))
        .json(&json!({"user_id": "ana", "surface_id": "cli", "conversation_id": conversation, "message": text}));
    if let Some(key) = key {
        request = request.header("X-API-Key", key);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "{text}");
    response.json().await.unwrap()
}

const METRICS_TOKEN: &str = "metrics-token-for-tests";

/// Requests the cloud refused with 401 so far.
async fn auth_failures(cloud: &CloudApp) -> f64 {
    let metrics = cloud.metrics(METRICS_TOKEN).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("maestra_auth_failures_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Each message's seq on one server, by id.
async fn seqs(base: &str, key: Option<&str>, conversation: &str) -> BTreeMap<String, i64> {
    let mut request = reqwest::Client::new().get(format!(
        "{base}/api/maestra/conversations/{conversation}?user_id=ana&limit=1000"
    ));
    if let Some(key) = key {
        request = request.header("X-API-Key", key);
    }
    let page: Value = request.send().await.unwrap().json().await.unwrap();
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["seq"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Cloud usage rows (one per reply the cloud made).
async fn cloud_usage_rows(cloud: &CloudApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM usage")
        .fetch_one(&cloud.pool)
        .await
        .unwrap()
}

async fn wait_for<F: AsyncFn() -> bool>(what: &str, within: Duration, check: F) -> Duration {
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_conversation_started_with_the_cli_reaches_the_cloud_and_a_mobile_reply_comes_back(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let local = linked_local(&cloud.app.address, &key, &[]).await;
    let home = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();

    // The CLI, against the local server.
    let asked = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", local.address.as_str()),
            ("MAESTRA_USER_ID", "ana"),
        ],
        &[
            "ask",
            "--conversation",
            "conv_cli",
            "Hello from the terminal",
        ],
    )
    .await;
    assert!(asked.status.success(), "{}", text(&asked.stderr));
    let local_view = listing(&client, &local.address, None, "ana", "conv_cli").await;
    assert_eq!(local_view.len(), 2);

    // Mobile sees it, whole and in order, within 2 s.
    let took = wait_for(
        "the cloud has the conversation",
        Duration::from_secs(2),
        async || {
            listing(&client, &cloud.app.address, Some(&key), "ana", "conv_cli").await == local_view
        },
    )
    .await;
    println!("local → cloud in {took:?}");

    // A reply written through the cloud shows locally when the conversation is read...
    say(
        &cloud.app.address,
        Some(&key),
        "conv_cli",
        "and from my phone",
    )
    .await;
    let read = listing(&client, &local.address, None, "ana", "conv_cli").await;
    assert_eq!(read.len(), 4);
    assert_eq!(read[2].1, "and from my phone");
    // ...and arrives by itself within the interval (1 s here) when nobody reads.
    say(
        &cloud.app.address,
        Some(&key),
        "conv_phone",
        "a new one from my phone",
    )
    .await;
    let file = local.conversations_dir().join("conv_phone.json");
    wait_for(
        "the phone's conversation arrives",
        Duration::from_secs(3),
        async || file.exists(),
    )
    .await;
    let both = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
    assert_eq!(both.len(), 2);

    // Each side counted the replies it made, and only those.
    assert_eq!(local.ledger().len(), 1);
    assert_eq!(cloud_usage_rows(&cloud).await, 2);

    let health: Value = local.get("/health").await.json().await.unwrap();
    assert_eq!(health["sync"]["state"], "ok");
    assert_eq!(health["sync"]["reachable"], true);
    assert!(health["sync"]["last_success"].is_string());
    let metrics = local.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("maestra_sync_records_total{direction=\"pushed\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("maestra_sync_pending_records 0"));
}

#[sqlx::test(migrations = false)]
async fn turns_made_on_both_sides_while_apart_converge_once_and_in_one_order(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let (proxy, local) = linked_through_proxy(&cloud, &[]).await;
    say(&local.address, None, "conv_shared", "before the cut").await;
    synced(&local).await;

    proxy.cut();
    for i in 0..3 {
        say(&local.address, None, "conv_shared", &format!("laptop {i}")).await;
        say(
            &cloud.app.address,
            Some(&key),
            "conv_shared",
            &format!("phone {i}"),
        )
        .await;
        say(
            &local.address,
            None,
            "conv_laptop",
            &format!("only here {i}"),
        )
        .await;
        say(
            &cloud.app.address,
            Some(&key),
            "conv_phone",
            &format!("only there {i}"),
        )
        .await;
    }
    let status = sync_now(&local).await;
    assert_eq!(status["state"], "offline");
    assert_eq!(status["reachable"], false);
    assert_eq!(status["pending"], 12, "6 local turns, 2 messages each");
    let health: Value = local.get("/health").await.json().await.unwrap();
    assert_eq!(
        health["status"], "healthy",
        "sync is never a reason to be unhealthy"
    );
    assert_eq!(health["sync"]["pending"], 12);

    let seqs_before = seqs(&local.address, None, "conv_shared").await;
    let cloud_seqs_before = seqs(&cloud.app.address, Some(&key), "conv_shared").await;
    proxy.restore();
    synced(&local).await;
    let both = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
    let shared = &both["conv_shared"];
    assert_eq!(shared.len(), 2 + 12);

    // A seq handed out never changes; the other side's messages arrived with new ones.
    for (base, api_key, before) in [
        (&local.address, None, seqs_before),
        (&cloud.app.address, Some(key.as_str()), cloud_seqs_before),
    ] {
        let after = seqs(base, api_key, "conv_shared").await;
        for (id, seq) in &before {
            assert_eq!(after.get(id), Some(seq), "{id} kept its seq");
        }
        // Paging by after_seq, three at a time, sees every message once.
        let client = reqwest::Client::new();
        let mut paged = Vec::new();
        let mut after_seq = 0;
        loop {
            let mut request = client.get(format!(
                "{base}/api/maestra/conversations/conv_shared?user_id=ana&limit=3&after_seq={after_seq}"
            ));
            if let Some(api_key) = api_key {
                request = request.header("X-API-Key", api_key);
            }
            let page: Value = request.send().await.unwrap().json().await.unwrap();
            paged.extend(
                page["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["id"].as_str().unwrap().to_owned()),
            );
            match page["next_after_seq"].as_i64() {
                Some(next) => after_seq = next,
                None => break,
            }
        }
        let mut expected: Vec<String> = shared.iter().map(|(id, _)| id.clone()).collect();
        expected.sort();
        paged.sort();
        assert_eq!(paged, expected, "{base}: each message once");
    }
    // The local turns keep their order among themselves, and so do the cloud's.
    let texts: Vec<&str> = shared.iter().map(|(_, t)| t.as_str()).collect();
    let position = |t: &str| texts.iter().position(|x| *x == t).unwrap();
    assert!(
        position("laptop 0") < position("laptop 1") && position("laptop 1") < position("laptop 2")
    );
    assert!(position("phone 0") < position("phone 1") && position("phone 1") < position("phone 2"));
    assert_eq!(both["conv_laptop"].len(), 6);
    assert_eq!(both["conv_phone"].len(), 6);

    // Cost counted once, where each reply was made.
    assert_eq!(local.ledger().len(), 1 + 6);
    assert_eq!(cloud_usage_rows(&cloud).await, 6);
    // Syncing again changes nothing.
    synced(&local).await;
    assert_eq!(
        assert_same(&local.address, &cloud.app.address, &key, "ana").await,
        both
    );
}

/// Failed rounds the local server counted with reason "unreachable" (its /metrics).
async fn unreachable_rounds(local: &TestApp) -> u64 {
    let metrics = local.get("/metrics").await.text().await.unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with("maestra_sync_failures_total{reason=\"unreachable\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[sqlx::test(migrations = false)]
async fn a_cloud_that_comes_back_is_caught_up_within_the_interval_unasked(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let (proxy, local) = linked_through_proxy(&cloud, &[("MAESTRA_SYNC_INTERVAL", "2")]).await;
    synced(&local).await;
    proxy.cut();
    say(&local.address, None, "conv_away", "while the cloud is away").await;
    // After five failed rounds, doubling alone would wait 8 to 16 s before the next one.
    let failed = Instant::now();
    while unreachable_rounds(&local).await < 5 {
        assert!(
            failed.elapsed() < Duration::from_secs(30),
            "five failed rounds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status: Value = local.get("/api/maestra/sync").await.json().await.unwrap();
    assert_eq!(status["state"], "offline", "{status}");
    assert_eq!(status["pending"], 2, "{status}");

    proxy.restore();
    let back = Instant::now();
    loop {
        let status: Value = local.get("/api/maestra/sync").await.json().await.unwrap();
        if status["state"] == "ok" && status["pending"] == 0 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "not caught up within the 2 s interval: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_same(&local.address, &cloud.app.address, &key, "ana").await;
}

#[sqlx::test(migrations = false)]
async fn deletions_made_while_apart_reach_the_other_side_and_never_come_back(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let (proxy, local) = linked_through_proxy(&cloud, &[]).await;
    for conversation in ["conv_gone_here", "conv_gone_there", "conv_kept"] {
        say(&local.address, None, conversation, "hello").await;
    }
    synced(&local).await;
    let pushed = cloud
        .pull(
            &key,
            &json!({"origin": "inst_replayer", "cursors": {"ana": 0}}),
        )
        .await;
    assert_eq!(pushed["records"].as_array().unwrap().len(), 6);

    proxy.cut();
    assert_eq!(
        local
            .delete("/api/maestra/conversations/conv_gone_here?user_id=ana")
            .await
            .status(),
        200
    );
    let deleted = cloud
        .request(
            Method::DELETE,
            "/api/maestra/conversations/conv_gone_there?user_id=ana",
            Some(&key),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    proxy.restore();
    synced(&local).await;
    let both = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
    assert_eq!(both.keys().collect::<Vec<_>>(), ["conv_kept"]);

    // An old copy pushed again (an install that never heard of the deletions) brings nothing
    // back, however often it is sent.
    let stale = json!({"origin": "inst_stale", "records": pushed["records"]});
    for _ in 0..2 {
        let response = cloud
            .request(Method::POST, "/api/maestra/sync/push", Some(&key))
            .json(&stale)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let counts: Value = response.json().await.unwrap();
        assert_eq!(
            (counts["added"].as_u64(), counts["dropped"].as_u64()),
            (Some(0), Some(4))
        );
    }
    synced(&local).await;
    let again = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
    assert_eq!(again.keys().collect::<Vec<_>>(), ["conv_kept"]);

    // The id is free for a new conversation, on either side, which syncs as usual.
    say(&local.address, None, "conv_gone_here", "a fresh start").await;
    synced(&local).await;
    let fresh = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
    assert_eq!(fresh["conv_gone_here"][0].1, "a fresh start");
}

#[sqlx::test(migrations = false)]
async fn a_turn_retried_on_the_cloud_with_the_same_idempotency_key_exists_once_on_each_side(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let (proxy, local) = linked_through_proxy(&cloud, &[]).await;
    let client = reqwest::Client::new();
    let body = json!({"user_id": "ana", "surface_id": "cli", "message": "Once, please"});
    let post = async |base: &str, api_key: Option<&str>, idempotency: &str| {
        let mut request = client
            .post(format!("{base}/api/maestra/core"))
            .header("Idempotency-Key", idempotency)
            .json(&body);
        if let Some(api_key) = api_key {
            request = request.header("X-API-Key", api_key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()
    };

    // Answered by both while apart (the client gave up on the local answer and retried on the
    // cloud): after sync, one question and one answer on each side.
    proxy.cut();
    let here = post(&local.address, None, "retry-1").await;
    let there = post(&cloud.app.address, Some(&key), "retry-1").await;
    assert_eq!(here["conversation_id"], there["conversation_id"]);
    assert_eq!(here["message_id"], there["message_id"]);
    proxy.restore();
    synced(&local).await;
    let both = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
    let conversation = here["conversation_id"].as_str().unwrap();
    assert_eq!(both[conversation].len(), 2, "{:?}", both[conversation]);
    assert_eq!(
        both[conversation][1].1,
        there["reply"].as_str().unwrap(),
        "the cloud's answer wins"
    );

    // Answered locally and synced first: the cloud answers the retry with that answer.
    let first = post(&local.address, None, "retry-2").await;
    synced(&local).await;
    let retried = post(&cloud.app.address, Some(&key), "retry-2").await;
    assert_eq!(retried["message_id"], first["message_id"]);
    assert_eq!(retried["reply"], first["reply"]);
    synced(&local).await;
    let both = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
    assert_eq!(both[first["conversation_id"].as_str().unwrap()].len(), 2);
    assert_eq!(
        cloud_usage_rows(&cloud).await,
        1,
        "the retry cost nothing more"
    );
}

#[sqlx::test(migrations = false)]
async fn a_new_install_pulls_the_whole_history_and_pages_end_exactly(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    const PAGE: usize = 7;
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let mut written = 0;
    // 0, 1, page-1, page, page+1 and 2·page records waiting, each pulled by a new install.
    for count in [0, 1, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE] {
        let records: Vec<Value> = (written..written + count)
            .map(|i| {
                json!({"kind": "message", "user_id": "ana", "conversation_id": format!("conv_{}", i % 3),
                       "id": format!("msg_{i:05}"), "role": "user", "surface_id": "cli",
                       "content": format!("m{i}"), "created_at": format!("2026-11-01T00:00:{:02}.{i:06}Z", i % 60)})
            })
            .collect();
        written += count;
        let pushed = cloud
            .request(Method::POST, "/api/maestra/sync/push", Some(&key))
            .json(&json!({"origin": "inst_elsewhere", "records": records}))
            .send()
            .await
            .unwrap();
        assert_eq!(pushed.status(), 200);
        let batch = PAGE.to_string();
        let local = linked_local(
            &cloud.app.address,
            &key,
            &[("MAESTRA_SYNC_BATCH", batch.as_str())],
        )
        .await;
        let status = synced(&local).await;
        assert_eq!(
            status["pulled"], written,
            "{written} records, pages of {PAGE}"
        );
        let all = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
        assert_eq!(all.values().map(Vec::len).sum::<usize>(), written);

        // The other way: the same counts written here are pushed in pages, completely.
        let provider = crate::clients::closed_url();
        let failing = linked_local(
            &cloud.app.address,
            &key,
            &[
                ("MAESTRA_SYNC_BATCH", batch.as_str()),
                ("MAESTRA_LLM_BASE_URL", provider.as_str()),
                ("MAESTRA_LLM_MODEL", "m"),
                ("MAESTRA_LLM_MAX_RETRIES", "0"),
            ],
        )
        .await;
        synced(&failing).await;
        let conversation = format!("conv_push_{count}");
        for i in 0..count {
            // The provider is down: each request stores exactly its user message.
            let response = failing
                .post_core(&json!({"user_id": "ana", "surface_id": "cli",
                                   "conversation_id": conversation, "message": format!("p{i}")}))
                .await;
            assert_eq!(response.status(), 502);
        }
        let status = synced(&failing).await;
        assert_eq!(status["pushed"], count, "{count} records, pages of {PAGE}");
        let client = reqwest::Client::new();
        let there = listing(
            &client,
            &cloud.app.address,
            Some(&key),
            "ana",
            &conversation,
        )
        .await;
        assert_eq!(there.len(), count);
        written += count;
    }
}

#[sqlx::test(migrations = false)]
async fn a_refused_key_or_a_cloud_away_leaves_local_mode_as_it_is_until_fixed(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[("MAESTRA_METRICS_TOKEN", METRICS_TOKEN)]).await;
    let (key_id, key) = cloud.create_key("default", None).await;
    let local = linked_local(&cloud.app.address, &key, &[]).await;
    say(&local.address, None, "conv_a", "one").await;
    synced(&local).await;

    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
        .bind(&key_id)
        .execute(&cloud.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    say(&local.address, None, "conv_a", "two").await;
    let status = sync_now(&local).await;
    assert_eq!(status["state"], "unauthorized", "{status}");
    assert_eq!(status["pending"], 2);
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("maestra sync setup")
    );
    // Local mode answers as ever; the refused key is not tried again on every write.
    let refusals = async || auth_failures(&cloud).await;
    let before = refusals().await;
    for i in 0..5 {
        say(&local.address, None, "conv_a", &format!("more {i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        refusals().await,
        before,
        "no retry storm with a refused key"
    );
    assert_eq!(
        local.get("/health").await.json::<Value>().await.unwrap()["sync"]["state"],
        "unauthorized"
    );

    // A new key saved (as `maestra sync setup` does): sync resumes and catches up.
    link(local.data_dir.path(), &cloud.app.address, &cloud.api_key);
    synced(&local).await;
    let both = assert_same(&local.address, &cloud.app.address, &cloud.api_key, "ana").await;
    assert_eq!(both["conv_a"].len(), 14);
}

#[sqlx::test(migrations = false)]
async fn sync_has_a_quota_of_its_own_and_never_eats_the_chat_quota(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(
        &db,
        &[
            ("MAESTRA_SYNC_RATE_LIMIT_REQUESTS", "3"),
            ("MAESTRA_SYNC_RATE_LIMIT_WINDOW", "60"),
        ],
    )
    .await;
    let (_, key) = cloud.create_key("default", Some((2, 60))).await;
    let pull = json!({"origin": "inst_a", "cursors": {"ana": 0}});
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = cloud
            .request(Method::POST, "/api/maestra/sync/pull", Some(&key))
            .json(&pull)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
            let error: Value = response.json().await.unwrap();
            assert!(
                error["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("sync quota")
            );
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    // The chat quota is whole.
    for _ in 0..2 {
        let response = cloud
            .core(
                &key,
                &json!({"user_id": "ana", "surface_id": "cli", "message": "hi"}),
            )
            .await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        cloud
            .core(
                &key,
                &json!({"user_id": "ana", "surface_id": "cli", "message": "hi"})
            )
            .await
            .status(),
        429
    );
}

#[sqlx::test(migrations = false)]
async fn bad_pushes_are_refused_whole_and_replays_add_nothing(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let message = |id: &str| {
        json!({"kind": "message", "user_id": "ana", "conversation_id": "conv_p", "id": id,
               "role": "user", "surface_id": "cli", "content": "hi",
               "created_at": "2026-11-01T00:00:00Z"})
    };
    let push = async |body: Value| {
        let response = cloud
            .request(Method::POST, "/api/maestra/sync/push", Some(&key))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let mut bad_id = message("msg_2");
    bad_id["conversation_id"] = json!("../etc");
    let mut huge = message("msg_3");
    huge["content"] = json!("x".repeat((1 << 20) + 1));
    let cases = [
        (
            json!({"origin": "inst_a", "records": [message("msg_1"), bad_id]}),
            400,
            "records[1]: conversation_id",
        ),
        (
            json!({"origin": "inst_a", "records": [message("msg_1"), huge]}),
            400,
            "records[1].content",
        ),
        (
            json!({"origin": "cloud", "records": [message("msg_1")]}),
            400,
            "origin",
        ),
        (
            json!({"origin": "inst_a", "records": [{"kind": "rename"}]}),
            400,
            "records[0]",
        ),
        (
            json!({"origin": "inst_a", "records": (0..501).map(|i| message(&format!("msg_x{i}"))).collect::<Vec<_>>()}),
            413,
            "at most 500",
        ),
        (json!([message("msg_1")]), 400, ""),
    ];
    for (body, status, names) in cases {
        let (got, error) = push(body).await;
        assert_eq!(got, status, "{names}: {error}");
        let text = error["error"]["message"].as_str().unwrap();
        assert!(text.contains(names), "{text:?} names {names:?}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&cloud.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing of a refused push is stored");

    let good = json!({"origin": "inst_a", "records": [message("msg_1"), message("msg_2")]});
    let (status, first) = push(good.clone()).await;
    assert_eq!((status, first["added"].as_u64()), (200, Some(2)));
    for _ in 0..3 {
        let (status, again) = push(good.clone()).await;
        assert_eq!(
            (
                status,
                again["added"].as_u64(),
                again["duplicates"].as_u64()
            ),
            (200, Some(0), Some(2))
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&cloud.pool)
        .await
        .unwrap();
    assert_eq!(stored, 2);
}

#[sqlx::test(migrations = false)]
async fn nothing_crosses_between_tenants_or_users(_: PgPoolOptions, db: PgConnectOptions) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let (_, acme) = cloud.create_key("acme", None).await;
    let (_, globex) = cloud.create_key("globex", None).await;
    let acme_local = linked_local(&cloud.app.address, &acme, &[]).await;
    say(&acme_local.address, None, "conv_demo", "acme's secret").await;
    let bob = acme_local
        .post_core(&json!({"user_id": "bob", "surface_id": "cli", "conversation_id": "conv_bob", "message": "bob's"}))
        .await;
    assert_eq!(bob.status(), 200);
    synced(&acme_local).await;

    // Another tenant's install with the same user and conversation id gets nothing of it.
    let globex_local = linked_local(&cloud.app.address, &globex, &[]).await;
    say(&globex_local.address, None, "conv_demo", "globex's own").await;
    synced(&globex_local).await;
    let client = reqwest::Client::new();
    let theirs = listing(&client, &globex_local.address, None, "ana", "conv_demo").await;
    assert_eq!(theirs.len(), 2);
    assert_eq!(theirs[0].1, "globex's own");
    let pulled = cloud
        .pull(
            &globex,
            &json!({"origin": "inst_x", "cursors": {"ana": 0, "bob": 0}}),
        )
        .await;
    let contents: Vec<&str> = pulled["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["content"].as_str())
        .collect();
    assert!(
        !contents
            .iter()
            .any(|c| c.contains("acme") || c.contains("bob")),
        "{contents:?}"
    );
    // A user that is only in the cloud is not pulled by an install that does not name it.
    let users: BTreeSet<String> = std::fs::read_dir(globex_local.conversations_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(users, BTreeSet::from(["conv_demo.json".to_owned()]));
}

#[sqlx::test(migrations = false)]
async fn a_turn_the_cloud_answered_while_the_local_server_was_down_is_local_once_it_is_back(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let data = tempfile::tempdir().unwrap();
    link(data.path(), &cloud.app.address, &key);
    let local =
        crate::helpers::ServerProcess::start(data.path(), &[("MAESTRA_SYNC_INTERVAL", "1")]).await;
    let local_url = local.url("");
    drop(local); // the local server is down

    let home = tempfile::tempdir().unwrap();
    let asked = maestra(
        home.path(),
        &[
            ("MAESTRA_LOCAL_URL", local_url.as_str()),
            ("MAESTRA_CLOUD_URL", cloud.app.address.as_str()),
            ("MAESTRA_API_KEY", key.as_str()),
            ("MAESTRA_FALLBACK_ENABLED", "true"),
            ("MAESTRA_USER_ID", "ana"),
        ],
        &[
            "ask",
            "--json",
            "--conversation",
            "conv_fallback",
            "Asked while local was down",
        ],
    )
    .await;
    assert!(asked.status.success(), "{}", text(&asked.stderr));
    let answer: Value = serde_json::from_slice(&asked.stdout).unwrap();
    assert_eq!(answer["backend"], "cloud");

    // Back up: the turn the cloud answered is in the local store, once.
    let local =
        crate::helpers::ServerProcess::start(data.path(), &[("MAESTRA_SYNC_INTERVAL", "1")]).await;
    let client = reqwest::Client::new();
    let base = local.url("");
    wait_for(
        "the cloud's turn is local",
        Duration::from_secs(5),
        async || {
            listing(&client, &base, None, "ana", "conv_fallback")
                .await
                .len()
                == 2
        },
    )
    .await;
    let here = listing(&client, &base, None, "ana", "conv_fallback").await;
    assert_eq!(here[0].1, "Asked while local was down");
    assert_eq!(here[1].1, answer["reply"].as_str().unwrap());
    let ledger =
        std::fs::read_to_string(data.path().join("maestra_metrics.jsonl")).unwrap_or_default();
    assert_eq!(
        ledger.lines().count(),
        0,
        "the cloud's reply is priced in the cloud only"
    );
}

#[sqlx::test(migrations = false)]
async fn two_cloud_replicas_receiving_the_same_pushes_at_once_keep_one_copy(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let first = spawn_cloud_app(&db, &[]).await;
    let url = crate::helpers::database_url(&db);
    let second = crate::helpers::spawn_cloud_app_at(&url, &url, &[]).await;
    let key = first.api_key.clone();
    let records: Vec<Value> = (0..300)
        .map(|i| {
            json!({"kind": "message", "user_id": "ana", "conversation_id": format!("conv_{}", i % 4),
                   "id": format!("msg_r{i:04}"), "role": if i % 2 == 0 { "user" } else { "assistant" },
                   "surface_id": "cli", "content": format!("m{i}"),
                   "created_at": format!("2026-11-01T00:{:02}:{:02}Z", i / 60, i % 60)})
        })
        .collect();
    let push = json!({"origin": "inst_twice", "records": records});
    let send = |replica: &CloudApp| {
        replica
            .request(Method::POST, "/api/maestra/sync/push", Some(&key))
            .json(&push)
            .send()
    };
    for _ in 0..3 {
        let (a, b) = tokio::join!(send(&first), send(&second));
        assert_eq!(
            (a.unwrap().status().as_u16(), b.unwrap().status().as_u16()),
            (200, 200)
        );
    }
    let (messages, ids, head): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT m.id), (SELECT feed_head FROM owners WHERE user_id = 'ana')
         FROM messages m",
    )
    .fetch_one(&first.pool)
    .await
    .unwrap();
    assert_eq!((messages, ids), (300, 300));
    assert_eq!(head, 300, "one feed number per stored message");
    let seqs: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.id, max(m.seq) FROM messages m JOIN conversations c ON c.pk = m.conversation_pk
         GROUP BY c.id ORDER BY c.id",
    )
    .fetch_all(&first.pool)
    .await
    .unwrap();
    assert!(
        seqs.iter().all(|(_, last)| *last == 75),
        "dense seqs: {seqs:?}"
    );
}

/// `maestra sync …` with `stdin` as its standard input.
async fn sync_command(
    data_dir: &std::path::Path,
    vars: &[(&str, &str)],
    args: &[&str],
    stdin: &str,
) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut command =
        tokio::process::Command::from(crate::helpers::maestra_command(data_dir, vars));
    command
        .arg("sync")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

#[sqlx::test(migrations = false)]
async fn sync_setup_checks_the_key_with_the_cloud_before_keeping_it_private(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    use std::os::unix::fs::PermissionsExt;
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let local = spawn_app_with(&[("MAESTRA_SYNC_INTERVAL", "1")]).await;
    let data = local.data_dir.path();
    let vars = [
        ("MAESTRA_LOCAL_URL", local.address.as_str()),
        ("MAESTRA_USER_ID", "ana"),
    ];
    let link_file = data.join("sync/cloud.json");
    let setup = ["setup", "--url", cloud.app.address.as_str()];

    // A wrong key, an unreachable cloud, a bad URL: one clear line, nothing saved.
    let wrong = sync_command(data, &vars, &setup, "sk_not_a_key_0123456789\n").await;
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        text(&wrong.stderr).contains("refused this API key; nothing was saved"),
        "{}",
        text(&wrong.stderr)
    );
    let away = crate::clients::closed_url();
    let unreachable = sync_command(data, &vars, &["setup", "--url", away.as_str()], &key).await;
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(
        text(&unreachable.stderr).contains("cannot reach the cloud"),
        "{}",
        text(&unreachable.stderr)
    );
    let bad_url = sync_command(data, &vars, &["setup", "--url", "ftp://x"], &key).await;
    assert_eq!(bad_url.status.code(), Some(1));
    assert!(
        text(&bad_url.stderr).starts_with("maestra: --url:"),
        "{}",
        text(&bad_url.stderr)
    );
    let no_key = sync_command(data, &vars, &setup, "").await;
    assert!(
        text(&no_key.stderr).contains("no API key"),
        "{}",
        text(&no_key.stderr)
    );
    for failed in [&wrong, &unreachable, &bad_url, &no_key] {
        assert_eq!(
            text(&failed.stderr).lines().count(),
            1,
            "{}",
            text(&failed.stderr)
        );
    }
    assert!(!link_file.exists());

    // The key on standard input: checked, kept 0600, and the running server syncs at once.
    say(
        &local.address,
        None,
        "conv_before",
        "written before the link",
    )
    .await;
    let done = sync_command(data, &vars, &setup, &format!("{key}\n")).await;
    assert!(done.status.success(), "{}", text(&done.stderr));
    let said = text(&done.stdout);
    assert!(
        said.contains("Sync set up with") && said.contains("for ana"),
        "{said}"
    );
    assert!(!said.contains(&key));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&link_file), 0o600);
    assert_eq!(mode(&data.join("sync")), 0o700);
    let client = reqwest::Client::new();
    wait_for(
        "the conversation reaches the cloud",
        Duration::from_secs(3),
        async || {
            listing(
                &client,
                &cloud.app.address,
                Some(&key),
                "ana",
                "conv_before",
            )
            .await
            .len()
                == 2
        },
    )
    .await;

    // Status and now, for people and as JSON.
    let status = sync_command(data, &vars, &["status"], "").await;
    assert!(status.status.success());
    assert!(
        text(&status.stdout).starts_with("sync: ok with http://127.0.0.1:"),
        "{}",
        text(&status.stdout)
    );
    let now = sync_command(data, &vars, &["now", "--json"], "").await;
    assert!(now.status.success(), "{}", text(&now.stderr));
    let now: Value = serde_json::from_slice(&now.stdout).unwrap();
    assert_eq!(
        (now["state"].as_str(), now["pending"].as_u64()),
        (Some("ok"), Some(0))
    );
    let health = crate::clients::maestra(data, &vars, &["health"]).await;
    assert!(
        text(&health.stdout).contains("sync with the cloud: ok"),
        "{}",
        text(&health.stdout)
    );

    // The key from MAESTRA_API_KEY works as well; it never shows in --help or a unit file.
    let mut with_env = vars.to_vec();
    with_env.push(("MAESTRA_API_KEY", key.as_str()));
    let again = sync_command(data, &with_env, &setup, "").await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    let help = sync_command(data, &with_env, &["setup", "--help"], "").await;
    assert!(!text(&help.stdout).contains(&key));
    let unit = crate::clients::maestra(
        data,
        &with_env,
        &["install", "--dry-run", "--platform", "linux"],
    )
    .await;
    assert!(unit.status.success(), "{}", text(&unit.stderr));
    assert!(!text(&unit.stdout).contains(&key));

    // Unlinked: the server stops syncing; nothing is deleted anywhere.
    let removed = sync_command(data, &vars, &["remove"], "").await;
    assert!(removed.status.success());
    assert!(!link_file.exists());
    assert_eq!(sync_now(&local).await["state"], "not_set_up");
    assert_eq!(
        listing(&client, &local.address, None, "ana", "conv_before")
            .await
            .len(),
        2
    );
}

#[sqlx::test(migrations = false)]
async fn maestra_sync_off_keeps_everything_on_this_machine(_: PgPoolOptions, db: PgConnectOptions) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    let local = linked_local(&cloud.app.address, &key, &[("MAESTRA_SYNC", "off")]).await;
    say(&local.address, None, "conv_private", "stays here").await;
    let status = sync_now(&local).await;
    assert_eq!(status["state"], "off");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&cloud.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    let health: Value = local.get("/health").await.json().await.unwrap();
    assert_eq!(health["sync"]["state"], "off");
}

#[sqlx::test(migrations = false)]
async fn a_new_install_pulls_a_ten_thousand_message_history(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let key = cloud.api_key.clone();
    for batch in 0..20 {
        let records: Vec<Value> = (0..500)
            .map(|i| {
                let n = batch * 500 + i;
                json!({"kind": "message", "user_id": "ana", "conversation_id": format!("conv_h{}", n % 20),
                       "id": format!("msg_h{n:05}"), "role": if n % 2 == 0 { "user" } else { "assistant" },
                       "surface_id": "cli", "content": format!("message {n} of the history"),
                       "created_at": format!("2026-10-{:02}T{:02}:{:02}:00Z", 1 + n / 1440, (n / 60) % 24, n % 60)})
            })
            .collect();
        let response = cloud
            .request(Method::POST, "/api/maestra/sync/push", Some(&key))
            .json(&json!({"origin": "inst_old_laptop", "records": records}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let started = Instant::now();
    let local = linked_local(&cloud.app.address, &key, &[]).await;
    let status = synced(&local).await;
    println!("pulled 10,000 messages in {:?}", started.elapsed());
    assert_eq!(status["pulled"], 10_000);
    let all = assert_same(&local.address, &cloud.app.address, &key, "ana").await;
    assert_eq!(all.len(), 20);
    assert_eq!(all.values().map(Vec::len).sum::<usize>(), 10_000);
    // Pulling put nothing in the ledger: those replies were priced elsewhere.
    assert!(local.ledger().is_empty());
}

/// Turns written through the API on one replica while an install pulls from another: each
/// message reaches the install once, however the pulls and the writes interleave (a turn takes
/// its feed number at the next pull, not when stored).
#[sqlx::test(migrations = false)]
async fn messages_written_while_an_install_pulls_reach_it_once_each(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let writer = spawn_cloud_app(&db, &[]).await;
    let url = crate::helpers::database_url(&db);
    let reader = crate::helpers::spawn_cloud_app_at(&url, &url, &[]).await;
    let key = writer.api_key.clone();
    let done = std::sync::atomic::AtomicBool::new(false);
    let writes = async {
        let conversations = (0..6).map(|c| {
            let (writer, key) = (&writer, &key);
            async move {
                for i in 0..8 {
                    let body = json!({"user_id": "ana", "surface_id": "cli",
                        "conversation_id": format!("conv_{c}"), "message": format!("turn {i}")});
                    assert_eq!(writer.core(key, &body).await.status(), 200);
                }
            }
        });
        futures_util::future::join_all(conversations).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let pulls = async {
        let (mut cursor, mut seen) = (0_i64, Vec::new());
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let body = json!({"origin": "inst_phone", "cursors": {"ana": cursor}, "limit": 7});
            let page = reader.pull(&key, &body).await;
            let next = page["cursors"]["ana"].as_i64().unwrap();
            assert!(next >= cursor, "the cursor went back: {cursor} -> {next}");
            cursor = next;
            let records = page["records"].as_array().unwrap();
            seen.extend(records.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
            if finished && records.is_empty() && page["more"] == false {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    };
    let ((), seen) = tokio::join!(writes, pulls);
    let stored: Vec<String> = sqlx::query_scalar("SELECT id FROM messages ORDER BY id")
        .fetch_all(&writer.pool)
        .await
        .unwrap();
    assert_eq!(
        stored.len(),
        6 * 8 * 2,
        "each turn stores a message and its reply"
    );
    let distinct: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(distinct.len(), seen.len(), "a message pulled twice");
    assert_eq!(distinct.into_iter().collect::<Vec<_>>(), stored);
}
