//! Cloud mode through real HTTP against a fresh Postgres database per test.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{CloudApp, TcpProxy, database_url, spawn_cloud_app, spawn_cloud_app_at};

fn body(user: &str, conversation: &str, text: &str) -> Value {
    json!({"user_id": user, "surface_id": "mobile", "conversation_id": conversation, "message": text})
}

async fn list_status(app: &CloudApp, key: &str) -> reqwest::Response {
    app.request(
        Method::GET,
        "/api/maestra/conversations?user_id=ana",
        Some(key),
    )
    .send()
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn the_guides_quick_start_works_with_the_bootstrap_key(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_cloud_app(&db, &[]).await;
    let health = app
        .request(Method::GET, "/health", Some(&app.api_key))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(
        (health["mode"].as_str(), health["storage"].as_str()),
        (Some("cloud"), Some("ok"))
    );

    let reply = app
        .core(&app.api_key, &body("justinharmon", "conv_m", "Hello"))
        .await;
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.headers()["x-ratelimit-limit"], "100");
    assert_eq!(reply.headers()["x-ratelimit-remaining"], "99");
    let reply: Value = reply.json().await.unwrap();
    assert_eq!(reply["backend"], "cloud");
    assert_eq!(reply["seq"], 2);

    // Bearer works as well, and the conversation continues.
    let again = app
        .request(Method::POST, "/api/maestra/core", None)
        .bearer_auth(&app.api_key)
        .json(&body("justinharmon", "conv_m", "Again"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["seq"], 4);
    let text = again["reply"].as_str().unwrap();
    assert!(text.contains("holds 3 messages"), "{text}");
}

#[sqlx::test(migrations = false)]
async fn every_bad_key_gets_the_same_401(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_cloud_app(&db, &[]).await;
    let (id, key) = app.create_key("acme", None).await;
    let wrong_secret = format!("mk_{id}_{}", "0".repeat(64));
    let expired = app.create_key("acme", None).await;
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(&expired.0)
        .execute(&app.pool)
        .await
        .unwrap();
    let revoked = app.create_key("acme", None).await;
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
        .bind(&revoked.0)
        .execute(&app.pool)
        .await
        .unwrap();

    let mut bodies = Vec::new();
    let cases: Vec<(&str, Option<(&str, String)>)> = vec![
        ("no key", None),
        ("empty X-API-Key", Some(("x-api-key", String::new()))),
        (
            "Bearer without a token",
            Some(("authorization", "Bearer ".to_owned())),
        ),
        (
            "Basic auth",
            Some(("authorization", format!("Basic {key}"))),
        ),
        (
            "unknown key",
            Some(("x-api-key", "sk_nobody_has_this_key".to_owned())),
        ),
        (
            "unknown id",
            Some(("x-api-key", format!("mk_000000000000_{}", "1".repeat(64)))),
        ),
        ("wrong secret", Some(("x-api-key", wrong_secret))),
        ("expired", Some(("x-api-key", expired.1.clone()))),
        ("revoked", Some(("x-api-key", revoked.1.clone()))),
    ];
    for (case, header) in cases {
        let mut request = app
            .request(Method::POST, "/api/maestra/core", None)
            .json(&body("ana", "conv_x", "hi"));
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{case}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{case}");
        let mut error: Value = response.json().await.unwrap();
        error["error"]["request_id"] = Value::Null;
        bodies.push(error);
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "401 bodies differ: {bodies:#?}"
    );
    assert_eq!(bodies[0]["error"]["code"], "unauthorized");

    // Nothing was stored from any of them; the valid key still works.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    assert_eq!(
        app.core(&key, &body("ana", "conv_x", "hi")).await.status(),
        200
    );
}

#[sqlx::test(migrations = false)]
async fn a_key_gets_its_burst_then_429_with_retry_after_and_other_keys_are_unaffected(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_cloud_app(&db, &[]).await;
    let (_, other) = app.create_key("acme", None).await;
    for n in 1..=100 {
        let response = list_status(&app, &app.api_key).await;
        assert_eq!(response.status(), 200, "request {n}");
        assert_eq!(
            response.headers()["x-ratelimit-remaining"],
            (100 - n).to_string().as_str()
        );
    }
    let limited = list_status(&app, &app.api_key).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["x-ratelimit-limit"], "100");
    assert_eq!(limited.headers()["x-ratelimit-remaining"], "0");
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let error: Value = limited.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limited");

    assert_eq!(
        list_status(&app, &other).await.status(),
        200,
        "another key is unaffected"
    );
    // /health is not counted.
    let health = app
        .request(Method::GET, "/health", Some(&app.api_key))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(
        list_status(&app, &app.api_key).await.status(),
        200,
        "served again after Retry-After"
    );
}

#[sqlx::test(migrations = false)]
async fn a_keys_own_row_can_set_its_quota(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_cloud_app(&db, &[]).await;
    let (_, small) = app.create_key("acme", Some((3, 60))).await;
    for _ in 0..3 {
        let response = list_status(&app, &small).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-ratelimit-limit"], "3");
    }
    assert_eq!(list_status(&app, &small).await.status(), 429);
}

#[sqlx::test(migrations = false)]
async fn a_revocation_in_sql_takes_effect_within_a_second(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_cloud_app(&db, &[("MAESTRA_AUTH_CACHE_TTL_SECONDS", "3600")]).await;
    let (id, key) = app.create_key("acme", None).await;
    assert_eq!(list_status(&app, &key).await.status(), 200);
    // Give the change listener its connection.
    tokio::time::sleep(Duration::from_millis(300)).await;

    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
        .bind(&id)
        .execute(&app.pool)
        .await
        .unwrap();
    let revoked_at = Instant::now();
    loop {
        let status = list_status(&app, &key).await.status();
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_rotated_key_keeps_working_for_its_grace_only(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_cloud_app(&db, &[]).await;
    let (old_id, old) = app.create_key("acme", Some((50, 60))).await;
    let old_id = maestra::auth::KeyId::parse(&old_id).unwrap();
    let (new_id, new, _) =
        maestra::auth::repository::rotate(&app.pool, &old_id, Duration::from_secs(2))
            .await
            .unwrap();
    let new = secrecy::ExposeSecret::expose_secret(&new).to_owned();

    assert_eq!(
        list_status(&app, &old).await.status(),
        200,
        "old key in its grace"
    );
    let response = list_status(&app, &new).await;
    assert_eq!(response.status(), 200, "new key");
    assert_eq!(
        response.headers()["x-ratelimit-limit"],
        "50",
        "the quota carries over"
    );
    let tenant: String = sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE id = $1")
        .bind(new_id.as_str())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(tenant, "acme");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        list_status(&app, &old).await.status(),
        401,
        "old key after its grace"
    );
    assert_eq!(
        list_status(&app, &new).await.status(),
        200,
        "new key after the grace"
    );
}

#[sqlx::test(migrations = false)]
async fn a_tenant_never_sees_another_tenants_conversations(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_cloud_app(&db, &[]).await;
    let (_, acme) = app.create_key("acme", None).await;
    let (_, globex) = app.create_key("globex", None).await;
    assert_eq!(
        app.core(&acme, &body("ana", "conv_secret", "acme only"))
            .await
            .status(),
        200
    );

    let read = app
        .request(
            Method::GET,
            "/api/maestra/conversations/conv_secret?user_id=ana",
            Some(&globex),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 404);
    let delete = app
        .request(
            Method::DELETE,
            "/api/maestra/conversations/conv_secret?user_id=ana",
            Some(&globex),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 404);
    let listed: Value = list_status(&app, &globex).await.json().await.unwrap();
    assert_eq!(listed["conversations"], json!([]));

    // Nor can it continue it, even knowing its id: the same id is a conversation of its own.
    let continued = app
        .core(&globex, &body("ana", "conv_secret", "let me in"))
        .await;
    assert_eq!(continued.status(), 200);
    let seen: Value = app
        .request(
            Method::GET,
            "/api/maestra/conversations/conv_secret?user_id=ana",
            Some(&globex),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seen: Vec<&str> = seen["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(seen.len(), 2, "its own message and the reply: {seen:?}");
    assert_eq!(seen[0], "let me in");
    let stored: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.tenant_id, m.content FROM messages m
         JOIN conversations c ON c.pk = m.conversation_pk
         WHERE m.role = 'user' ORDER BY c.tenant_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        [
            ("acme".to_owned(), "acme only".to_owned()),
            ("globex".to_owned(), "let me in".to_owned())
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn two_users_and_two_tenants_each_get_their_own_conv_demo(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_cloud_app(&db, &[]).await;
    let (_, acme) = app.create_key("acme", None).await;
    let (_, globex) = app.create_key("globex", None).await;
    let posts = [
        (&acme, "ana", "ana at acme"),
        (&acme, "ben", "ben at acme"),
        (&globex, "ana", "ana at globex"),
    ];
    for (key, user, text) in posts {
        let response = app.core(key, &body(user, "conv_demo", text)).await;
        assert_eq!(
            response.status(),
            200,
            "{text}: the first post to conv_demo"
        );
    }
    for (key, user, text) in posts {
        let page: Value = app
            .request(
                Method::GET,
                &format!("/api/maestra/conversations/conv_demo?user_id={user}"),
                Some(key),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let messages = page["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2, "{text}");
        assert_eq!(messages[0]["content"], text);
        assert_eq!(messages[0]["seq"], 1, "{text}: a conversation of its own");
    }
}

#[sqlx::test(migrations = false)]
async fn guessing_keys_is_limited_per_address(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_cloud_app(&db, &[]).await;
    assert_eq!(list_status(&app, &app.api_key).await.status(), 200);
    let (_, fresh) = app.create_key("acme", None).await;
    let mut statuses = Vec::new();
    for i in 0..25 {
        let guess = format!("sk_guess_number_{i:04}");
        statuses.push(list_status(&app, &guess).await.status().as_u16());
    }
    // 20 failed authentications per address (a valid key's first use is not one of them).
    assert!(statuses[..20].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == 429), "{statuses:?}");
    // A key already verified is not held back by its neighbours' guesses; one not verified
    // yet waits like any other attempt from this address.
    assert_eq!(list_status(&app, &app.api_key).await.status(), 200);
    assert_eq!(list_status(&app, &fresh).await.status(), 429);
}

#[sqlx::test(migrations = false)]
async fn the_failed_authentication_limit_is_a_setting(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_cloud_app(&db, &[("MAESTRA_AUTH_FAILURE_LIMIT", "3")]).await;
    let mut statuses = Vec::new();
    for i in 0..5 {
        let guess = format!("sk_guess_number_{i:04}");
        statuses.push(list_status(&app, &guess).await.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
}

#[sqlx::test(migrations = false)]
async fn the_database_never_holds_a_plaintext_key(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_cloud_app(&db, &[]).await;
    let (_, key) = app.create_key("acme", None).await;
    assert_eq!(list_status(&app, &key).await.status(), 200);
    let dump = std::process::Command::new("pg_dump")
        .arg(&app.database_url)
        .output()
        .expect("pg_dump must be installed (postgresql-client)");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8(dump.stdout).unwrap();
    assert!(dump.contains("$argon2id$"), "the dump holds the hashes");
    let secret = key.rsplit('_').next().unwrap();
    for needle in [key.as_str(), secret, app.api_key.as_str()] {
        assert!(!dump.contains(needle), "the dump contains a key");
    }
}

#[sqlx::test(migrations = false)]
async fn losing_postgres_answers_503_and_the_service_recovers_by_itself(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let direct = database_url(&db);
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let proxied = direct.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(
        proxied, direct,
        "DATABASE_URL must name 127.0.0.1:5432 for this test"
    );
    let app = spawn_cloud_app_at(&proxied, &direct, &[]).await;
    assert_eq!(
        app.core(&app.api_key, &body("ana", "conv_d", "before"))
            .await
            .status(),
        200
    );

    proxy.cut();
    let health = app
        .request(Method::GET, "/health", None)
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "degraded");
    let during = app
        .core(&app.api_key, &body("ana", "conv_d", "during"))
        .await;
    assert_eq!(during.status(), 503);
    let error: Value = during.json().await.unwrap();
    assert_eq!(error["error"]["code"], "storage_unavailable");

    proxy.restore();
    let restored = Instant::now();
    while app
        .request(Method::GET, "/health", None)
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(restored.elapsed() < Duration::from_secs(15), "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.core(&app.api_key, &body("ana", "conv_d", "after"))
            .await
            .status(),
        200
    );
    let contents: Vec<String> =
        sqlx::query_scalar("SELECT content FROM messages WHERE role = 'user' ORDER BY seq")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(contents, ["before", "after"]);
}

#[sqlx::test(migrations = false)]
async fn replicas_starting_at_once_migrate_safely(_: PgPoolOptions, db: PgConnectOptions) {
    let apps = futures_util::future::join_all((0..3).map(|_| spawn_cloud_app(&db, &[]))).await;
    for app in &apps {
        assert_eq!(
            app.core(&app.api_key, &body("ana", "conv_r", "hi"))
                .await
                .status(),
            200
        );
    }
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&apps[0].pool)
        .await
        .unwrap();
    assert_eq!(keys, 1, "the bootstrap key is ensured once");
}

#[sqlx::test(migrations = false)]
async fn a_burst_of_first_requests_with_a_new_key_runs_argon2_once(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_cloud_app(&db, &[("MAESTRA_METRICS_TOKEN", "token-123")]).await;
    let (_, key) = app.create_key("acme", None).await;
    let burst = (0..40).map(|_| list_status(&app, &key));
    let statuses: Vec<u16> = futures_util::future::join_all(burst)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let metrics = app.metrics("token-123").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "maestra_auth_argon2_verifications_total 1"),
        "{metrics}"
    );
}
