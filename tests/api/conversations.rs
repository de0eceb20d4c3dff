use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn a_users_conversations_are_listed_newest_first_and_paginated() {
    let app = spawn_app().await;
    for id in ["conv_a", "conv_b", "conv_c"] {
        app.say("ana", "cli", Some(id), "hello").await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.say("bob", "cli", Some("conv_bob"), "not ana's").await;

    let page: Value = app
        .get("/api/maestra/conversations?user_id=ana&limit=2")
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = page["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["conv_c", "conv_b"]);
    assert_eq!(page["next_offset"], 2);

    let rest: Value = app
        .get("/api/maestra/conversations?user_id=ana&limit=2&offset=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["conversations"][0]["conversation_id"], "conv_a");
    assert_eq!(rest["conversations"].as_array().unwrap().len(), 1);
    assert!(rest["next_offset"].is_null());
}

#[tokio::test]
async fn messages_are_paginated_by_seq() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.say("ana", "cli", Some("conv_p"), &format!("m{i}"))
            .await;
    }
    let first: Value = app
        .get("/api/maestra/conversations/conv_p?user_id=ana&limit=4")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["messages"].as_array().unwrap().len(), 4);
    assert_eq!(first["next_after_seq"], 4);

    let second: Value = app
        .get("/api/maestra/conversations/conv_p?user_id=ana&after_seq=4&limit=4")
        .await
        .json()
        .await
        .unwrap();
    let seqs: Vec<i64> = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [5, 6]);
    assert!(second["next_after_seq"].is_null());
}

#[tokio::test]
async fn delete_erases_the_conversation_and_its_file() {
    let app = spawn_app().await;
    app.say("ana", "cli", Some("conv_gone"), "forget me").await;
    assert!(app.conversations_dir().join("conv_gone.json").exists());

    let response = app
        .delete("/api/maestra/conversations/conv_gone?user_id=ana")
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["deleted"], true);
    assert!(!app.conversations_dir().join("conv_gone.json").exists());

    let after = app
        .get("/api/maestra/conversations/conv_gone?user_id=ana")
        .await;
    assert_eq!(after.status(), 404);
    let again = app
        .delete("/api/maestra/conversations/conv_gone?user_id=ana")
        .await;
    assert_eq!(again.status(), 404);
}

#[tokio::test]
async fn one_file_per_conversation_with_private_permissions() {
    use std::os::unix::fs::PermissionsExt;

    let app = spawn_app().await;
    for id in ["conv_1", "conv_2", "conv_3"] {
        app.say("ana", "cli", Some(id), "hi").await;
        app.say("ana", "browser_ext", Some(id), "hi again").await;
    }
    let dir = app.conversations_dir();
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(entries.len(), 3);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for entry in entries {
        assert_eq!(mode(&entry.path()), 0o600, "{:?}", entry.path());
    }
    assert_eq!(
        mode(&app.data_dir.path().join("maestra_metrics.jsonl")),
        0o600
    );
}
