use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::spawn_app;

#[tokio::test]
async fn the_guides_browser_extension_call_gets_a_full_reply() {
    let app = spawn_app().await;
    let body = app
        .say("justinharmon", "browser_ext", Some("conv_guide"), "Hello")
        .await;
    assert!(
        body["reply"]
            .as_str()
            .unwrap()
            .contains("no model provider is configured")
    );
    assert_eq!(body["conversation_id"], "conv_guide");
    assert_eq!(body["surface_id"], "browser_ext");
    assert_eq!(body["seq"], 2, "the reply follows the user's message");
    assert_eq!(body["model"], "maestra-offline");
    assert_eq!(body["backend"], "local");
    assert!(body["message_id"].as_str().unwrap().starts_with("msg_"));
    assert!(body["created_at"].is_string());
    for field in ["prompt_tokens", "completion_tokens"] {
        assert!(body["usage"][field].as_u64().unwrap() > 0, "{field}");
    }
    assert_eq!(body["usage"]["cost_usd"], 0.0);
}

#[tokio::test]
async fn without_a_conversation_id_a_new_conversation_is_started() {
    let app = spawn_app().await;
    let first = app.say("ana", "cli", None, "one").await;
    let second = app.say("ana", "cli", None, "two").await;
    let (a, b) = (
        first["conversation_id"].as_str().unwrap(),
        second["conversation_id"].as_str().unwrap(),
    );
    assert!(a.starts_with("conv_"));
    assert_ne!(a, b);
}

#[tokio::test]
async fn a_second_surface_continues_the_conversation_and_sees_the_first() {
    let app = spawn_app().await;
    app.say(
        "justinharmon",
        "browser_ext",
        Some("conv_x"),
        "from the browser",
    )
    .await;
    let reply = app
        .say("justinharmon", "cli", Some("conv_x"), "from the terminal")
        .await;
    assert_eq!(reply["seq"], 4);
    let text = reply["reply"].as_str().unwrap();
    assert!(
        text.contains("3 messages from 2 surfaces (browser_ext, cli)"),
        "{text}"
    );

    let history: Value = app
        .get("/api/maestra/conversations/conv_x?user_id=justinharmon")
        .await
        .json()
        .await
        .unwrap();
    let messages: Vec<(i64, &str, &str, &str)> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_i64().unwrap(),
                m["role"].as_str().unwrap(),
                m["surface_id"].as_str().unwrap(),
                m["content"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0], (1, "user", "browser_ext", "from the browser"));
    assert_eq!(
        (messages[1].0, messages[1].1, messages[1].2),
        (2, "assistant", "browser_ext")
    );
    assert_eq!(messages[2], (3, "user", "cli", "from the terminal"));
    assert_eq!(
        (messages[3].0, messages[3].1, messages[3].2),
        (4, "assistant", "cli")
    );
}

#[tokio::test]
async fn surfaces_posting_at_once_are_all_stored_with_distinct_seqs() {
    let app = spawn_app().await;
    let posts = (0..16u32).map(|i| {
        let app = &app;
        async move {
            let surface = if i.is_multiple_of(2) {
                "windsurf"
            } else {
                "browser_ext"
            };
            app.say("ana", surface, Some("conv_busy"), &format!("message {i}"))
                .await
        }
    });
    futures_util::future::join_all(posts).await;

    let history: Value = app
        .get("/api/maestra/conversations/conv_busy?user_id=ana")
        .await
        .json()
        .await
        .unwrap();
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 32);
    let seqs: Vec<i64> = messages
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=32).collect::<Vec<_>>());
    let texts: HashSet<&str> = messages
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 16);
}

#[tokio::test]
async fn each_answer_adds_one_line_to_the_cost_ledger() {
    let app = spawn_app().await;
    let mut costs = 0.0;
    for i in 0..3 {
        let body = app
            .say("ana", "cli", Some("conv_cost"), &format!("q{i}"))
            .await;
        costs += body["usage"]["cost_usd"].as_f64().unwrap();
    }
    let ledger =
        std::fs::read_to_string(app.data_dir.path().join("maestra_metrics.jsonl")).unwrap();
    let lines: Vec<Value> = ledger
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let mut sum = 0.0;
    for line in &lines {
        for field in [
            "ts",
            "conversation_id",
            "surface_id",
            "model",
            "latency_ms",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
        ] {
            assert!(!line[field].is_null(), "ledger line lacks {field}");
        }
        assert_eq!(line["conversation_id"], "conv_cost");
        sum += line["cost_usd"].as_f64().unwrap();
    }
    assert_eq!(sum, costs);
}

#[tokio::test]
async fn unknown_fields_are_ignored() {
    let app = spawn_app().await;
    let response = app
        .post_core(
            &json!({"user_id": "ana", "surface_id": "cli", "message": "hi", "colour": "blue"}),
        )
        .await;
    assert_eq!(response.status(), 200);
}
