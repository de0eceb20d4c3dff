//! `GET /openapi.json` held to what the server really does: the document is fetched from a
//! running server, and real responses of every route are validated against the schema it
//! gives for that route and status (objects closed, so an undocumented field fails too).

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{TestApp, spawn_app, spawn_cloud_app};

struct Contract {
    document: Value,
}

impl Contract {
    async fn fetch(app: &TestApp) -> Contract {
        let response = app.get("/openapi.json").await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-request-id"));
        let document: Value = response.json().await.unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        // The licence the binary is distributed under (Cargo.toml, LICENSE).
        assert_eq!(
            document["info"]["license"],
            json!({"name": "GPL-3.0-or-later", "identifier": "GPL-3.0-or-later"})
        );
        Contract { document }
    }

    fn operation(&self, path: &str, method: &str) -> &Value {
        let operation = &self.document["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        operation
    }

    /// Checks a real response against the document: its status is documented (or covered
    /// by `default`), and its body fits that status's schema.
    async fn check(&self, path: &str, method: &str, response: reqwest::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        let has_request_id = response.headers().contains_key("x-request-id");
        let body: Value = response.json().await.unwrap();
        let responses = &self.operation(path, method)["responses"];
        let documented = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
            .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
        assert!(
            documented["headers"]["X-Request-Id"].is_object() && has_request_id,
            "{method} {path} {status}: X-Request-Id"
        );
        let schema = &documented["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path} {status}: no JSON schema"
        );
        self.assert_fits(schema, &body, &format!("{method} {path} {status}"));
        (status, body)
    }

    fn assert_fits(&self, schema: &Value, instance: &Value, what: &str) {
        let errors = self.errors(schema, instance);
        assert!(errors.is_empty(), "{what}: {errors:?}\nbody: {instance}");
    }

    fn errors(&self, schema: &Value, instance: &Value) -> Vec<String> {
        // The schema, with the document's components beside it so that its $refs resolve.
        let mut root = closed(schema.clone());
        root["components"] = closed(self.document["components"].clone());
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap();
        validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }

    fn request_schema(&self, path: &str, method: &str) -> &Value {
        &self.operation(path, method)["requestBody"]["content"]["application/json"]["schema"]
    }
}

/// Every object schema with properties admits no others: a field the server sends must be
/// documented. (The served document stays open, so that clients accept additions.)
fn closed(mut schema: Value) -> Value {
    match &mut schema {
        Value::Object(object) => {
            if object.contains_key("properties") && !object.contains_key("additionalProperties") {
                object.insert("additionalProperties".to_owned(), json!(false));
            }
            for value in object.values_mut() {
                *value = closed(value.take());
            }
        }
        Value::Array(items) => {
            for value in items.iter_mut() {
                *value = closed(value.take());
            }
        }
        _ => {}
    }
    schema
}

const CORE: &str = "/api/maestra/core";
const LIST: &str = "/api/maestra/conversations";
const ONE: &str = "/api/maestra/conversations/{conversation_id}";

#[tokio::test]
async fn every_route_is_documented_and_local_responses_match_the_document() {
    let app = spawn_app().await;
    let contract = Contract::fetch(&app).await;

    let mut routes: Vec<String> = Vec::new();
    for (path, item) in contract.document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push(format!("{method} {path}"));
        }
    }
    routes.sort();
    assert_eq!(
        routes,
        [
            "delete /api/maestra/conversations/{conversation_id}",
            "get /api/maestra/conversations",
            "get /api/maestra/conversations/{conversation_id}",
            "get /api/maestra/sync",
            "get /health",
            "get /health/live",
            "get /health/ready",
            "get /metrics",
            "get /openapi.json",
            "post /api/maestra/advisor/ask",
            "post /api/maestra/core",
            "post /api/maestra/sync/now",
        ]
    );
    // Local mode asks for no key.
    assert!(contract.operation(CORE, "post").get("security").is_none());

    let (_, health) = contract
        .check("/health", "get", app.get("/health").await)
        .await;
    assert_eq!(health["status"], "healthy");
    let (_, live) = contract
        .check("/health/live", "get", app.get("/health/live").await)
        .await;
    assert_eq!(live["status"], "alive");
    let (_, ready) = contract
        .check("/health/ready", "get", app.get("/health/ready").await)
        .await;
    assert_eq!(ready["status"], "ready");
    contract
        .check("/openapi.json", "get", app.get("/openapi.json").await)
        .await;
    assert_eq!(health["sync"]["state"], "not_set_up");
    let (_, sync) = contract
        .check(
            "/api/maestra/sync",
            "get",
            app.get("/api/maestra/sync").await,
        )
        .await;
    assert_eq!(sync["state"], "not_set_up");
    let now = app
        .client
        .post(format!("{}/api/maestra/sync/now", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(
        contract.check("/api/maestra/sync/now", "post", now).await.0,
        200
    );

    // The request schema takes what the server takes, and refuses what it refuses.
    let request = contract.request_schema(CORE, "post").clone();
    let guide = json!({"user_id": "justinharmon", "surface_id": "browser_ext",
                       "conversation_id": "conv_demo", "message": "Hello"});
    contract.assert_fits(&request, &guide, "the guide's request");
    for bad in [
        json!({"surface_id": "cli", "message": "Hello"}),
        json!({"user_id": "a b", "surface_id": "cli", "message": "Hello"}),
        json!({"user_id": "ana", "surface_id": "cli", "conversation_id": "../x", "message": "Hi"}),
        json!({"user_id": "ana", "surface_id": "cli", "message": ""}),
    ] {
        assert!(!contract.errors(&request, &bad).is_empty(), "{bad} fits");
    }

    let (_, reply) = contract
        .check(CORE, "post", app.post_core(&guide).await)
        .await;
    assert_eq!(reply["conversation_id"], "conv_demo");
    let new = json!({"user_id": "justinharmon", "surface_id": "cli", "message": "A new one"});
    contract
        .check(CORE, "post", app.post_core(&new).await)
        .await;
    const ADVISOR: &str = "/api/maestra/advisor/ask";
    for (question, expected) in [
        (
            json!({"question": "What is 8825?", "context": "a repo"}),
            200,
        ),
        (json!({"context": "no question"}), 400),
    ] {
        let response = app
            .client
            .post(format!("{}{ADVISOR}", app.address))
            .json(&question)
            .send()
            .await
            .unwrap();
        let (status, _) = contract.check(ADVISOR, "post", response).await;
        assert_eq!(status, expected);
    }
    let core_failures = [
        (json!({"surface_id": "cli", "message": "Hi"}), 400),
        (
            json!({"user_id": "bob", "surface_id": "cli", "conversation_id": "conv_demo", "message": "Hi"}),
            404,
        ),
        (
            json!({"user_id": "ana", "surface_id": "cli", "message": "a".repeat(33 * 1024)}),
            413,
        ),
    ];
    for (body, expected) in core_failures {
        let (status, _) = contract
            .check(CORE, "post", app.post_core(&body).await)
            .await;
        assert_eq!(status, expected, "{body}");
    }
    let not_json = app
        .client
        .post(format!("{}{CORE}", app.address))
        .body("Hello")
        .send()
        .await
        .unwrap();
    assert_eq!(contract.check(CORE, "post", not_json).await.0, 415);

    let listed = [
        (
            "/api/maestra/conversations?user_id=justinharmon&limit=1",
            200,
        ),
        ("/api/maestra/conversations?user_id=justinharmon", 200),
        ("/api/maestra/conversations", 400),
        (
            "/api/maestra/conversations?user_id=justinharmon&limit=0",
            400,
        ),
    ];
    for (url, expected) in listed {
        let (status, body) = contract.check(LIST, "get", app.get(url).await).await;
        assert_eq!(status, expected, "{url}");
        if url.ends_with("limit=1") {
            assert_eq!(body["next_offset"], 1, "a page with more after it");
        }
    }

    let messages = [
        (
            "/api/maestra/conversations/conv_demo?user_id=justinharmon",
            200,
        ),
        (
            "/api/maestra/conversations/conv_demo?user_id=justinharmon&after_seq=1&limit=1",
            200,
        ),
        ("/api/maestra/conversations/conv_demo?user_id=bob", 404),
        (
            "/api/maestra/conversations/conv_demo?user_id=justinharmon&after_seq=x",
            400,
        ),
    ];
    for (url, expected) in messages {
        let (status, _) = contract.check(ONE, "get", app.get(url).await).await;
        assert_eq!(status, expected, "{url}");
    }

    let url = "/api/maestra/conversations/conv_demo?user_id=justinharmon";
    assert_eq!(
        contract.check(ONE, "delete", app.delete(url).await).await.0,
        200
    );
    assert_eq!(
        contract.check(ONE, "delete", app.delete(url).await).await.0,
        404
    );

    // Storage gone: /health and the core endpoint answer 503, as documented.
    std::fs::remove_dir_all(app.conversations_dir()).unwrap();
    let (status, health) = contract
        .check("/health", "get", app.get("/health").await)
        .await;
    assert_eq!((status, health["status"].as_str()), (503, Some("degraded")));
    let (status, _) = contract
        .check(CORE, "post", app.post_core(&new).await)
        .await;
    assert_eq!(status, 503);
}

#[sqlx::test(migrations = false)]
async fn the_cloud_document_names_its_keys_and_cloud_responses_match_it(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let cloud = spawn_cloud_app(&db, &[]).await;
    let contract = Contract::fetch(&cloud.app).await;
    let schemes = &contract.document["components"]["securitySchemes"];
    assert_eq!(
        schemes["api_key"],
        json!({"type": "apiKey", "in": "header", "name": "X-API-Key"})
    );
    assert_eq!(
        schemes["bearer"],
        json!({"type": "http", "scheme": "bearer"})
    );
    let either = json!([{"api_key": []}, {"bearer": []}]);
    for (path, method) in [(CORE, "post"), (LIST, "get"), (ONE, "get"), (ONE, "delete")] {
        assert_eq!(
            contract.operation(path, method)["security"],
            either,
            "{method} {path}"
        );
    }
    assert!(
        contract
            .operation("/health", "get")
            .get("security")
            .is_none()
    );

    let body = json!({"user_id": "ana", "surface_id": "mobile", "message": "Hello"});
    let without_key = cloud
        .request(Method::POST, CORE, None)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(contract.check(CORE, "post", without_key).await.0, 401);
    let (status, reply) = contract
        .check(CORE, "post", cloud.core(&cloud.api_key, &body).await)
        .await;
    assert_eq!((status, reply["backend"].as_str()), (200, Some("cloud")));
    let bearer = cloud
        .request(Method::GET, "/api/maestra/conversations?user_id=ana", None)
        .bearer_auth(&cloud.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(contract.check(LIST, "get", bearer).await.0, 200);

    // Sync: what installs push and pull, as documented; each mode documents its own side.
    assert!(
        contract.document["paths"]
            .get("/api/maestra/sync/now")
            .is_none()
    );
    const PUSH: &str = "/api/maestra/sync/push";
    const PULL: &str = "/api/maestra/sync/pull";
    let record = json!({"kind": "message", "user_id": "ana", "conversation_id": "conv_s",
                        "id": "msg_s1", "role": "user", "surface_id": "cli", "content": "hi",
                        "created_at": "2026-11-01T00:00:00Z"});
    let push = json!({"origin": "inst_doc", "records": [record,
        {"kind": "deletion", "user_id": "ana", "conversation_id": "conv_gone",
         "deleted_at": "2026-11-01T00:00:00Z"}]});
    contract.assert_fits(
        &contract.request_schema(PUSH, "post").clone(),
        &push,
        "a push",
    );
    let pushes = [
        (push.clone(), 200),
        (
            json!({"origin": "inst_doc", "records": [{"kind": "message"}]}),
            400,
        ),
        (json!({"origin": "inst_doc"}), 400),
    ];
    for (body, expected) in pushes {
        let response = cloud
            .request(Method::POST, PUSH, Some(&cloud.api_key))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            contract.check(PUSH, "post", response).await.0,
            expected,
            "{body}"
        );
    }
    let pull = json!({"origin": "inst_other", "cursors": {"ana": 0}, "limit": 10});
    contract.assert_fits(
        &contract.request_schema(PULL, "post").clone(),
        &pull,
        "a pull",
    );
    for (body, expected) in [
        (pull, 200),
        (json!({"origin": "inst_other", "cursors": {"ana": -1}}), 400),
    ] {
        let response = cloud
            .request(Method::POST, PULL, Some(&cloud.api_key))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, pulled) = contract.check(PULL, "post", response).await;
        assert_eq!(status, expected, "{body}");
        if status == 200 {
            let records = pulled["records"].as_array().unwrap();
            assert!(records.iter().any(|r| r["id"] == "msg_s1"), "{pulled}");
            assert!(records.iter().any(|r| r["kind"] == "deletion"), "{pulled}");
        }
    }
    let unauthorized = cloud
        .request(Method::POST, PULL, None)
        .json(&json!({"origin": "inst_other", "cursors": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(contract.check(PULL, "post", unauthorized).await.0, 401);

    let (_, limited_key) = cloud.create_key("acme", Some((1, 60))).await;
    cloud.core(&limited_key, &body).await;
    let over = cloud.core(&limited_key, &body).await;
    assert!(over.headers().contains_key("retry-after"));
    assert_eq!(contract.check(CORE, "post", over).await.0, 429);
}
