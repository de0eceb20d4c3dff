//! Cloud mode through Debian's PgBouncer (1.18, which does not track prepared statements) in
//! transaction mode, with fewer server connections than clients so sessions really are shared.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use maestra::config::Settings;
use maestra::startup::Application;

use futures_util::StreamExt;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{CloudApp, all_messages, database_url, postgres_address, spawn_cloud_app_at};
use crate::rig::PgBouncer;

/// 120 core requests from two servers at once, 24 at a time, into 12 conversations; the
/// statuses that were not 200.
async fn traffic(apps: &[&CloudApp]) -> Vec<String> {
    let requests = (0..120).map(|i| {
        let app = apps[i % apps.len()];
        let body = json!({"user_id": "ana", "surface_id": "cli",
            "conversation_id": format!("conv_{}", i % 12), "message": format!("m{i}")});
        async move {
            let response = app.core(&app.api_key, &body).await;
            let status = response.status();
            (status, response.text().await.unwrap_or_default())
        }
    });
    futures_util::stream::iter(requests)
        .buffer_unordered(24)
        .filter(|(status, _)| std::future::ready(*status != 200))
        .map(|(status, text)| format!("{status} {text}"))
        .collect()
        .await
}

#[sqlx::test(migrations = false)]
async fn the_service_works_through_pgbouncer_in_transaction_mode(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let direct = database_url(&db);
    let postgres = postgres_address();
    let bouncer = PgBouncer::start(&postgres, 3);
    let through = bouncer.route(&direct, &postgres);
    let vars = [
        ("MAESTRA_DB_POOL_MODE", "transaction"),
        ("MAESTRA_DATABASE_DIRECT_URL", direct.as_str()),
        ("MAESTRA_AUTH_CACHE_TTL_SECONDS", "3600"),
    ];
    let a = spawn_cloud_app_at(&through, &direct, &vars).await;
    let b = spawn_cloud_app_at(&through, &direct, &vars).await;

    let failures = traffic(&[&a, &b]).await;
    assert!(failures.is_empty(), "{failures:#?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&a.pool)
        .await
        .unwrap();
    assert_eq!(stored, 240, "every message and reply");
    let seqs: Vec<i64> = all_messages(&a.app.address, Some(&a.api_key), "conv_3")
        .await
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=20).collect::<Vec<i64>>(),
        "one order, distinct seqs"
    );

    // Reading, idempotency and deleting go through it too.
    let listed = a
        .request(
            reqwest::Method::GET,
            "/api/maestra/conversations?user_id=ana&limit=50",
            Some(&a.api_key),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.unwrap();
    assert_eq!(listed["conversations"].as_array().unwrap().len(), 12);
    let body = json!({"user_id": "ana", "surface_id": "cli", "message": "once"});
    let send = |app: &CloudApp| {
        app.request(
            reqwest::Method::POST,
            "/api/maestra/core",
            Some(&app.api_key),
        )
        .header("Idempotency-Key", "k-1")
        .json(&body)
        .send()
    };
    let first: Value = send(&a).await.unwrap().json().await.unwrap();
    let again: Value = send(&b).await.unwrap().json().await.unwrap();
    assert_eq!(first, again);
    let deleted = a
        .request(
            reqwest::Method::DELETE,
            "/api/maestra/conversations/conv_0?user_id=ana",
            Some(&a.api_key),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);

    // The key change feed LISTENs on the direct connection: a revocation still reaches both
    // servers within a second.
    let (id, key) = a.create_key("acme", None).await;
    for app in [&a, &b] {
        let ok = app
            .request(
                reqwest::Method::GET,
                "/api/maestra/conversations?user_id=ana",
                Some(&key),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
        .bind(&id)
        .execute(&a.pool)
        .await
        .unwrap();
    let revoked = Instant::now();
    for app in [&a, &b] {
        loop {
            let status = app
                .request(
                    reqwest::Method::GET,
                    "/api/maestra/conversations?user_id=ana",
                    Some(&key),
                )
                .send()
                .await
                .unwrap()
                .status();
            if status == 401 {
                break;
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "still accepted after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The control: the same PgBouncer, with sqlx left as it is for a direct connection. Its
/// named prepared statements outlive their transaction on a shared server session: a second
/// server cannot even start, or its traffic fails.
#[sqlx::test(migrations = false)]
async fn without_transaction_mode_sqlxs_prepared_statements_break_through_pgbouncer(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let direct = database_url(&db);
    let postgres = postgres_address();
    let bouncer = PgBouncer::start(&postgres, 1);
    let through = bouncer.route(&direct, &postgres);
    // Migrations and the change feed still go direct: only the statements differ.
    let vars = [("MAESTRA_DATABASE_DIRECT_URL", direct.as_str())];
    let a = spawn_cloud_app_at(&through, &direct, &vars).await;
    let env: HashMap<String, String> = [
        ("MAESTRA_MODE", "cloud"),
        ("MAESTRA_HOST", "127.0.0.1"),
        ("MAESTRA_PORT", "0"),
        ("DATABASE_URL", through.as_str()),
        ("MAESTRA_DATABASE_DIRECT_URL", direct.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let second = Application::build(Settings::load_from(env).unwrap()).await;
    let errors = match second {
        Err(e) => vec![format!("{e:#}")],
        Ok(_) => traffic(&[&a]).await,
    };
    eprintln!("without transaction mode: {errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("prepared statement")),
        "expected prepared-statement errors: {errors:?}"
    );
}
