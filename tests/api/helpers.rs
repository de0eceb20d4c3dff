//! Helpers shared by the test binaries: the service in-process on a random port, or the real
//! `maestra` binary as a child process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use maestra::config::Settings;
use maestra::startup::Application;
use serde_json::{Value, json};
use tempfile::TempDir;

/// The service running in this process, on a random port, with its own data folder.
pub struct TestApp {
    pub address: String,
    pub data_dir: TempDir,
    pub client: reqwest::Client,
    server: actix_web::dev::ServerHandle,
    running: tokio::task::AbortHandle,
}

impl Drop for TestApp {
    /// Stops the server with the test, so that it lets go of its database at once.
    fn drop(&mut self) {
        drop(self.server.stop(false));
        self.running.abort();
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// The model the tests configure, and its price in USD per million input / output tokens.
pub const TEST_MODEL: &str = "fake-model";
pub const TEST_PRICE_INPUT: &str = "2.5";
pub const TEST_PRICE_OUTPUT: &str = "10";
pub const TEST_LLM_API_KEY: &str = "sk-test-do-not-log";

/// The service with `base_url` as its model provider, short timeouts, and `vars` on top.
pub async fn spawn_app_with_provider(base_url: &str, vars: &[(&str, &str)]) -> TestApp {
    let mut all = vec![
        ("MAESTRA_LLM_BASE_URL", base_url),
        ("MAESTRA_LLM_MODEL", TEST_MODEL),
        ("MAESTRA_LLM_API_KEY", TEST_LLM_API_KEY),
        ("MAESTRA_LLM_PRICE_INPUT", TEST_PRICE_INPUT),
        ("MAESTRA_LLM_PRICE_OUTPUT", TEST_PRICE_OUTPUT),
        ("MAESTRA_LLM_CONNECT_TIMEOUT", "1"),
        ("MAESTRA_LLM_REQUEST_TIMEOUT", "5"),
    ];
    all.extend_from_slice(vars);
    spawn_app_with(&all).await
}

pub async fn spawn_app_with(vars: &[(&str, &str)]) -> TestApp {
    let data_dir = tempfile::tempdir().unwrap();
    let mut env: HashMap<String, String> = HashMap::from([
        ("MAESTRA_PORT".to_owned(), "0".to_owned()),
        (
            "MAESTRA_DATA_DIR".to_owned(),
            data_dir.path().to_str().unwrap().to_owned(),
        ),
    ]);
    env.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let settings = Settings::load_from(env).unwrap();
    let app = Application::build(settings).await.unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    let server = app.handle();
    let running = tokio::spawn(app.run_until_stopped()).abort_handle();
    TestApp {
        address,
        data_dir,
        client: reqwest::Client::new(),
        server,
        running,
    }
}

impl TestApp {
    pub fn conversations_dir(&self) -> PathBuf {
        self.data_dir.path().join("conversations")
    }

    pub async fn post_core(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/maestra/core", self.address))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Sends one message and returns the 200 response's body.
    pub async fn say(
        &self,
        user: &str,
        surface: &str,
        conversation: Option<&str>,
        text: &str,
    ) -> Value {
        let mut body = json!({"user_id": user, "surface_id": surface, "message": text});
        if let Some(id) = conversation {
            body["conversation_id"] = json!(id);
        }
        let response = self.post_core(&body).await;
        assert_eq!(response.status(), 200, "core call failed");
        response.json().await.unwrap()
    }

    /// Asks for the reply as Server-Sent Events (`"stream": true`).
    pub async fn post_core_streaming(&self, body: &Value) -> reqwest::Response {
        let mut body = body.clone();
        body["stream"] = json!(true);
        self.post_core(&body).await
    }

    /// The conversation's stored messages, oldest first.
    pub async fn messages(&self, user: &str, conversation: &str) -> Vec<Value> {
        let response = self
            .get(&format!(
                "/api/maestra/conversations/{conversation}?user_id={user}"
            ))
            .await;
        assert_eq!(response.status(), 200, "reading {conversation}");
        let body: Value = response.json().await.unwrap();
        body["messages"].as_array().unwrap().clone()
    }

    /// The cost ledger's lines.
    pub fn ledger(&self) -> Vec<Value> {
        let path = self.data_dir.path().join("maestra_metrics.jsonl");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path_and_query}", self.address))
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .delete(format!("{}{path_and_query}", self.address))
            .send()
            .await
            .unwrap()
    }
}

/// The events of a whole Server-Sent Events body, as (event name, JSON data).
pub async fn read_events(response: reqwest::Response) -> Vec<(String, Value)> {
    let text = response.text().await.unwrap();
    parse_events(&text)
}

pub fn parse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = "message".to_owned();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            (name, serde_json::from_str(&data).unwrap())
        })
        .collect()
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// The real `maestra serve` binary, as a user starts it.
pub struct ServerProcess {
    pub child: Child,
    pub port: u16,
}

impl ServerProcess {
    /// Starts `maestra serve` on `data_dir` and waits until it answers `/health`.
    pub async fn start(data_dir: &Path, vars: &[(&str, &str)]) -> ServerProcess {
        let port_file = data_dir.join("maestra.port");
        let _ = std::fs::remove_file(&port_file);
        let mut command = maestra_command(data_dir, vars);
        // Owned by the guard at once, so that a failed start still reaps the child.
        let mut server = ServerProcess {
            child: command.arg("serve").spawn().unwrap(),
            port: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        loop {
            assert!(Instant::now() < deadline, "the server did not start");
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
            {
                let health = client
                    .get(format!("http://127.0.0.1:{port}/health"))
                    .send()
                    .await;
                if health.is_ok_and(|r| r.status() == 200) {
                    server.port = port;
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts `maestra serve` on the port in `vars` (cloud mode has no port file) and waits
    /// until it answers `/health`.
    pub async fn start_at_port(data_dir: &Path, vars: &[(&str, &str)]) -> ServerProcess {
        let port: u16 = vars
            .iter()
            .find(|(k, _)| *k == "MAESTRA_PORT")
            .map(|(_, v)| v.parse().unwrap())
            .expect("MAESTRA_PORT in vars");
        let mut server = ServerProcess {
            child: maestra_command(data_dir, vars)
                .arg("serve")
                .spawn()
                .unwrap(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        loop {
            assert!(Instant::now() < deadline, "the server did not start");
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "the server exited"
            );
            let health = client.get(server.url("/health")).send().await;
            if health.is_ok_and(|r| r.status() == 200) {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn kill_hard(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `maestra` with a clean environment: only the given data folder and variables.
pub fn maestra_command(data_dir: &Path, vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_maestra"));
    command
        .env_clear()
        .env("HOME", data_dir)
        .env("MAESTRA_DATA_DIR", data_dir)
        .env("MAESTRA_PORT", "0")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// The URL of the database a `#[sqlx::test]` made for this test.
pub fn database_url(connect: &sqlx::postgres::PgConnectOptions) -> String {
    let base = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at Postgres for the cloud tests (bash .ci/run sets it)");
    let server = base.split('?').next().unwrap().rsplit_once('/').unwrap().0;
    format!("{server}/{}", connect.get_database().unwrap())
}

/// A cloud-mode server on a random port, with its own fresh database.
pub struct CloudApp {
    pub app: TestApp,
    /// `MAESTRA_API_KEY`, ensured by the server at start.
    pub api_key: String,
    pub database_url: String,
    pub pool: sqlx::PgPool,
    /// The server's PgBouncer, when the suite runs through one; stopped with the app.
    pub pgbouncer: Option<crate::rig::PgBouncer>,
}

/// What a `maestra serve` process needs to answer through `provider` and price its replies.
pub fn priced_provider_vars(provider: &crate::fake_provider::FakeProvider) -> Vec<(&str, &str)> {
    vec![
        ("MAESTRA_LLM_BASE_URL", provider.base_url.as_str()),
        ("MAESTRA_LLM_MODEL", TEST_MODEL),
        ("MAESTRA_LLM_API_KEY", TEST_LLM_API_KEY),
        ("MAESTRA_LLM_PRICE_INPUT", TEST_PRICE_INPUT),
        ("MAESTRA_LLM_PRICE_OUTPUT", TEST_PRICE_OUTPUT),
    ]
}

pub const TEST_API_KEY: &str = "sk_test_key_0123456789";

/// With `MAESTRA_TEST_VIA_PGBOUNCER=1` (a step of `.ci/run`), each server reaches its
/// database through its own PgBouncer in transaction mode, as a deployment with many replicas
/// would; the test's own queries stay direct.
pub async fn spawn_cloud_app(
    connect: &sqlx::postgres::PgConnectOptions,
    vars: &[(&str, &str)],
) -> CloudApp {
    let url = database_url(connect);
    if std::env::var("MAESTRA_TEST_VIA_PGBOUNCER").is_ok_and(|v| v == "1") {
        let postgres = postgres_address();
        let bouncer = crate::rig::PgBouncer::start(&postgres, 4);
        let through = bouncer.route(&url, &postgres);
        let mut all = vec![
            ("MAESTRA_DB_POOL_MODE", "transaction"),
            ("MAESTRA_DATABASE_DIRECT_URL", url.as_str()),
        ];
        all.extend_from_slice(vars);
        let mut app = spawn_cloud_app_at(&through, &url, &all).await;
        app.pgbouncer = Some(bouncer);
        return app;
    }
    spawn_cloud_app_at(&url, &url, vars).await
}

/// `host:port` of the test Postgres, from `DATABASE_URL`.
pub fn postgres_address() -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let rest = base.split_once("://").map_or(base.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// A cloud-mode server whose database connection goes through `server_url` (e.g. a proxy),
/// while the test itself uses `direct_url`.
pub async fn spawn_cloud_app_at(
    server_url: &str,
    direct_url: &str,
    vars: &[(&str, &str)],
) -> CloudApp {
    let mut all = vec![
        ("MAESTRA_MODE", "cloud"),
        ("MAESTRA_HOST", "127.0.0.1"),
        ("DATABASE_URL", server_url),
        ("MAESTRA_API_KEY", TEST_API_KEY),
    ];
    all.extend_from_slice(vars);
    let app = spawn_app_with(&all).await;
    let api_key = all
        .iter()
        .rev()
        .find(|(k, _)| *k == "MAESTRA_API_KEY")
        .unwrap()
        .1
        .to_owned();
    CloudApp {
        app,
        api_key,
        database_url: direct_url.to_owned(),
        pool: sqlx::PgPool::connect(direct_url).await.unwrap(),
        pgbouncer: None,
    }
}

impl CloudApp {
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let request = self
            .app
            .client
            .request(method, format!("{}{path}", self.app.address));
        match key {
            Some(key) => request.header("X-API-Key", key),
            None => request,
        }
    }

    pub async fn core(&self, key: &str, body: &Value) -> reqwest::Response {
        self.request(reqwest::Method::POST, "/api/maestra/core", Some(key))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// A sync pull's answer (`body`: origin, cursors, limit), which must be a success.
    pub async fn pull(&self, key: &str, body: &Value) -> Value {
        let response = self
            .request(reqwest::Method::POST, "/api/maestra/sync/pull", Some(key))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// The `/metrics` text, scraped with the metrics token.
    pub async fn metrics(&self, token: &str) -> String {
        self.request(reqwest::Method::GET, "/metrics", None)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Creates a key the way `maestra keys create` does, returning (id, key).
    pub async fn create_key(&self, tenant: &str, quota: Option<(u32, u64)>) -> (String, String) {
        use secrecy::ExposeSecret;
        let new = maestra::auth::repository::NewKey {
            tenant: tenant.to_owned(),
            label: None,
            quota: quota.map(|(requests, seconds)| maestra::ratelimit::Quota {
                requests: std::num::NonZeroU32::new(requests).unwrap(),
                window: Duration::from_secs(seconds),
            }),
            expires_at: None,
        };
        let (id, key) = maestra::auth::repository::create(&self.pool, &new)
            .await
            .unwrap();
        (id.to_string(), key.expose_secret().to_owned())
    }
}

/// A TCP forwarder in front of Postgres that a test can cut and restore, to see the server
/// lose its database and get it back.
pub struct TcpProxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl TcpProxy {
    pub async fn start(target: &str) -> TcpProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accept_up, accept_links, target) = (up.clone(), links.clone(), target.to_owned());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                accept_links.lock().unwrap().push(link.abort_handle());
            }
        });
        TcpProxy { port, up, links }
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// All messages of a conversation, following pagination.
pub async fn all_messages(base: &str, key: Option<&str>, conversation: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    let mut messages = Vec::new();
    let mut after = 0;
    loop {
        let url = format!(
            "{base}/api/maestra/conversations/{conversation}?user_id=ana&after_seq={after}&limit=1000"
        );
        let mut request = client.get(url);
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{conversation} is readable");
        let page: Value = response.json().await.unwrap();
        messages.extend(page["messages"].as_array().unwrap().iter().cloned());
        match page["next_after_seq"].as_i64() {
            Some(next) => after = next,
            None => return messages,
        }
    }
}
