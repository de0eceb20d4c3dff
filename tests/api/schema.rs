//! The cloud schema's migrations on a database that already holds data: nothing is lost, and
//! the server carries on with it.

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{database_url, spawn_cloud_app};

/// The migrations released before conversation ids were scoped by owner.
const BEFORE_OWNERS: [&str; 2] = [
    "20261125000001_initial_schema.sql",
    "20261125000002_idempotency_keys.sql",
];

#[sqlx::test(migrations = false)]
async fn scoping_conversations_by_owner_keeps_every_message_and_its_order(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    // A database as the previous release left it.
    let url = database_url(&db);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let old = tempfile::tempdir().unwrap();
    for name in BEFORE_OWNERS {
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(name),
            old.path().join(name),
        )
        .unwrap();
    }
    sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO tenants (id) VALUES ('default'), ('acme');
         INSERT INTO conversations (id, tenant_id, user_id, last_seq, created_at, updated_at)
         VALUES ('conv_old', 'default', 'ana', 3, now() - interval '1 day', now() - interval '1 hour'),
                ('conv_other', 'acme', 'ben', 1, now() - interval '2 days', now() - interval '2 days');
         INSERT INTO messages (conversation_id, seq, id, role, surface_id, content, created_at,
                               model, prompt_tokens, completion_tokens, cost_usd)
         VALUES ('conv_old', 1, 'msg_a', 'user', 'cli', 'first', now() - interval '3 hours', NULL, NULL, NULL, NULL),
                ('conv_old', 2, 'msg_b', 'assistant', 'cli', 'second', now() - interval '2 hours', 'm', 3, 4, 0.5),
                ('conv_old', 3, 'msg_c', 'user', 'mobile', 'third', now() - interval '1 hour', NULL, NULL, NULL, NULL),
                ('conv_other', 1, 'msg_d', 'user', 'cli', 'elsewhere', now() - interval '2 days', NULL, NULL, NULL, NULL);
         INSERT INTO usage (tenant_id, user_id, conversation_id, surface_id, model,
                            prompt_tokens, completion_tokens, cost_usd)
         VALUES ('default', 'ana', 'conv_old', 'cli', 'm', 3, 4, 0.5);",
    )
    .execute(&pool)
    .await
    .unwrap();

    // The new release starts on it: its migrations run at start.
    let app = spawn_cloud_app(&db, &[]).await;
    let key = app.api_key.clone();
    let page: Value = app
        .request(
            Method::GET,
            "/api/maestra/conversations/conv_old?user_id=ana",
            Some(&key),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kept: Vec<(i64, &str, &str)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_i64().unwrap(),
                m["id"].as_str().unwrap(),
                m["content"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kept,
        [
            (1, "msg_a", "first"),
            (2, "msg_b", "second"),
            (3, "msg_c", "third")
        ]
    );
    assert_eq!(page["messages"][1]["usage"]["cost_usd"], 0.5);

    // Each owner's feed numbers its messages in the order they were written.
    let feed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT m.id, m.feed_seq FROM messages m JOIN owners o ON o.id = m.owner_id
         WHERE o.tenant_id = 'default' AND o.user_id = 'ana' ORDER BY m.feed_seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        feed,
        [
            ("msg_a".to_owned(), 1),
            ("msg_b".to_owned(), 2),
            ("msg_c".to_owned(), 3)
        ]
    );

    // The conversation goes on where it was, after its newest message.
    let next = app
        .core(
            &key,
            &json!({"user_id": "ana", "surface_id": "cli", "conversation_id": "conv_old", "message": "fourth"}),
        )
        .await;
    assert_eq!(next.status(), 200);
    let next: Value = next.json().await.unwrap();
    assert_eq!(next["seq"], 5, "the user's message was 4, the reply 5");
    let heads = || async {
        sqlx::query_as::<_, (String, i64)>("SELECT user_id, feed_head FROM owners ORDER BY user_id")
            .fetch_all(&app.pool)
            .await
            .unwrap()
    };
    assert_eq!(
        heads().await,
        [("ana".to_owned(), 3), ("ben".to_owned(), 1)],
        "a turn's messages wait for the next pull to be numbered"
    );
    let pulled = app
        .pull(
            &key,
            &json!({"origin": "inst_phone", "cursors": {"ana": 3}}),
        )
        .await;
    let contents: Vec<&str> = pulled["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents.len(), 2, "{pulled}");
    assert_eq!(contents[0], "fourth");
    assert_eq!(pulled["cursors"]["ana"], 5);
    assert_eq!(
        heads().await,
        [("ana".to_owned(), 5), ("ben".to_owned(), 1)]
    );

    // Another tenant's data and the usage ledger are untouched.
    let usage: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage WHERE conversation_id = 'conv_old'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(usage, 2, "the old line and the new reply's");
    let other: String = sqlx::query_scalar(
        "SELECT m.content FROM messages m JOIN conversations c ON c.pk = m.conversation_pk
         WHERE c.tenant_id = 'acme' AND c.id = 'conv_other'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(other, "elsewhere");
}
