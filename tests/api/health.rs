use crate::helpers::spawn_app;

#[tokio::test]
async fn health_reports_healthy_with_version_mode_and_storage() {
    let app = spawn_app().await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["version"], "2.0.0");
    assert_eq!(body["mode"], "local");
    assert_eq!(body["storage"], "ok");
}

#[tokio::test]
async fn health_is_degraded_when_the_storage_folder_is_gone() {
    let app = spawn_app().await;
    std::fs::remove_dir_all(app.conversations_dir()).unwrap();
    let response = app.get("/health").await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["storage"], "unavailable");
}

#[tokio::test]
async fn a_clients_request_id_is_echoed_and_a_new_one_given_otherwise() {
    let app = spawn_app().await;
    let sent = app
        .client
        .get(format!("{}/health", app.address))
        .header("X-Request-Id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.headers()["x-request-id"], "trace-me-42");

    let a = app.get("/health").await.headers()["x-request-id"].clone();
    let b = app.get("/health").await.headers()["x-request-id"].clone();
    assert_ne!(a, b);
}

#[tokio::test]
async fn an_unknown_route_is_a_json_404_and_a_wrong_method_a_json_405() {
    let app = spawn_app().await;
    let response = app.get("/nope").await;
    assert_eq!(response.status(), 404);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["request_id"], request_id);

    let response = app.delete("/health").await;
    assert_eq!(response.status(), 405);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn cors_admits_browser_extensions_and_refuses_web_pages() {
    let app = spawn_app_with_origin().await;
    let preflight = |origin: &'static str| {
        app.client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/maestra/core", app.address),
            )
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "content-type")
            .send()
    };
    for origin in [
        "chrome-extension://abcdefghijklmnop",
        "moz-extension://1234-5678",
        "safari-web-extension://xyz",
        "https://app.example",
    ] {
        let response = preflight(origin).await.unwrap();
        assert_eq!(response.status(), 200, "{origin}");
        assert_eq!(response.headers()["access-control-allow-origin"], origin);
    }
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert!(refused.status().is_client_error());
}

async fn spawn_app_with_origin() -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(&[("MAESTRA_CORS_ORIGINS", "https://app.example")]).await
}
