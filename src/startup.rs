//! Builds the whole service from `Settings`, binds its port, then runs it. `maestra serve` and
//! the tests start the same `Application`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::{Condition, from_fn};
use actix_web::{App, HttpServer, web};
use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::AbortHandle;

use crate::api::{self, AppState, middleware};
use crate::auth::Authenticator;
use crate::auth::middleware::{FailureQuota, SyncQuota};
use crate::auth::repository;
use crate::config::{Mode, PoolMode, PortChoice, Settings};
use crate::db::{self, Db};
use crate::idempotency::{FileIdempotency, PgIdempotency};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::responder;
use crate::service::ConversationService;
use crate::store::{FileStore, MeasuredStore, PgStore, create_private_dir};
use crate::sync::{CloudSync, LocalSync, SyncSide};
use crate::turns::Turns;

/// The tenant of every local-mode conversation.
pub const LOCAL_TENANT: &str = "local";
/// How long a client may take to send a request's head.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The listening socket's accept queue (the kernel caps it: net.core.somaxconn on Linux).
const LISTEN_BACKLOG: i32 = 8192;
/// How long in-flight requests, and turns whose clients have gone, may take to finish after
/// SIGINT/SIGTERM (the service units wait 35 s: `service_unit::STOP_TIMEOUT_SECONDS`).
const SHUTDOWN_GRACE_SECONDS: u64 = 30;
/// Of that, how long the requests still in flight once the turns are done (reads, sync, the end
/// of a stream to a slow client) may take.
const REQUEST_GRACE_SECONDS: u64 = 5;

pub struct Application {
    port: u16,
    server: Server,
    /// Local mode: the data folder's lock and port file, released when serving ends.
    local: Option<LocalInstance>,
    /// Cloud mode: flushed once more at shutdown.
    authenticator: Option<Arc<Authenticator>>,
    /// Work that lives as long as the server, stopped with it.
    background: BackgroundTasks,
    /// Raised on SIGTERM/SIGINT; `/health/ready` then answers 503 for `drain`.
    draining: Arc<AtomicBool>,
    drain: Duration,
    /// Conversation turns, waited for at a stop (their clients may have gone).
    turns: Turns,
}

/// Tasks that serve the server (e.g. following key changes); aborted when dropped.
struct BackgroundTasks(Vec<AbortHandle>);

impl BackgroundTasks {
    fn stop(&self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Drop for BackgroundTasks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One server per data folder: the lock is held, and the port file kept, while it lives.
struct LocalInstance {
    _lock: File,
    /// Closed cleanly once the server has stopped.
    store: FileStore,
    port_file: PathBuf,
    port: u16,
}

impl Drop for LocalInstance {
    fn drop(&mut self) {
        if fs::read_to_string(&self.port_file).is_ok_and(|p| p.trim() == self.port.to_string()) {
            let _ = fs::remove_file(&self.port_file);
        }
    }
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        match settings.mode {
            Mode::Local => Self::build_local(settings),
            Mode::Cloud => Self::build_cloud(settings).await,
        }
    }

    fn build_local(settings: Settings) -> anyhow::Result<Self> {
        let data_dir = &settings.data_dir;
        create_private_dir(data_dir)?;
        let lock = lock_data_dir(data_dir)?;

        let metrics = Arc::new(Metrics::new(settings.mode.as_str())?);
        let store = FileStore::open(
            data_dir.join("conversations"),
            &data_dir.join("journal"),
            settings.history_messages,
        )?;
        let service = ConversationService::new(
            Arc::new(MeasuredStore::new(
                Arc::new(store.clone()),
                Arc::clone(&metrics),
            )),
            responder::from_settings(&settings.llm)?,
            settings.history_messages,
            Arc::clone(&metrics),
            Arc::new(FileIdempotency::open(&store)?),
        )
        .with_history_chars(settings.llm.history_chars);

        let listener = bind(settings.host, &settings.port)?;
        let port = listener.local_addr()?.port();
        let port_file = data_dir.join("maestra.port");
        write_port_file(&port_file, port)?;
        let local = LocalInstance {
            _lock: lock,
            store: store.clone(),
            port_file,
            port,
        };

        let sync = LocalSync::new(
            data_dir,
            store.clone(),
            settings.sync.clone(),
            Arc::clone(&metrics),
        )?;
        let background = BackgroundTasks(vec![tokio::spawn(sync.clone().run()).abort_handle()]);
        let state = app_state(
            service,
            &settings,
            Some(LOCAL_TENANT.to_owned()),
            SyncSide::Local(sync),
            None,
        );
        let draining = Arc::clone(&state.draining);
        let turns = state.turns.clone();
        let server = serve(listener, state, metrics, &settings, None)?;
        tracing::info!(
            mode = settings.mode.as_str(),
            address = %SocketAddr::new(settings.host, port),
            data_dir = %data_dir.display(),
            "maestra is serving"
        );
        Ok(Self {
            port,
            server,
            local: Some(local),
            authenticator: None,
            background,
            draining,
            drain: settings.drain,
            turns,
        })
    }

    async fn build_cloud(settings: Settings) -> anyhow::Result<Self> {
        let mode = settings.replicas.db_pool_mode;
        let split = db::split_connections(settings.db_max_connections, http_workers());
        let pool = db::connect_in(
            "DATABASE_URL",
            settings.require_database_url()?,
            split.map_or(settings.db_max_connections, |(_, shared)| shared),
            mode,
        )
        .await?;
        // Migrations hold a session-level advisory lock and the key change feed LISTENs: both
        // need a session of their own, which a transaction pooler does not keep.
        let direct = match &settings.replicas.database_direct_url {
            Some(url) => {
                db::connect_in("MAESTRA_DATABASE_DIRECT_URL", url, 2, PoolMode::Session).await?
            }
            None => pool.clone(),
        };
        db::migrate(&direct).await?;
        if let Some(key) = &settings.api_key {
            let id = repository::ensure_bootstrap(&direct, key).await?;
            tracing::info!(key.id = %id, tenant.id = repository::DEFAULT_TENANT, "MAESTRA_API_KEY is a valid key");
        }
        let mut db = Db::new(pool.clone(), mode);
        if let Some((each, _)) = split {
            db = db.with_worker_pools(http_workers(), each);
        }

        let metrics = Arc::new(Metrics::new(settings.mode.as_str())?);
        let authenticator = Arc::new(
            Authenticator::new(
                pool,
                settings.rate_limit,
                settings.auth_cache_ttl,
                metrics.argon2_verifications.clone(),
            )
            .with_pools(db.clone(), direct),
        );
        let idempotency = PgIdempotency::new(db.clone());
        let background = BackgroundTasks(vec![
            tokio::spawn(Arc::clone(&authenticator).follow_key_changes()).abort_handle(),
            tokio::spawn(Arc::clone(&authenticator).flush_last_used_periodically()).abort_handle(),
            tokio::spawn(idempotency.clone().prune_periodically()).abort_handle(),
        ]);

        let sync = SyncSide::Cloud(CloudSync::new(db.clone()));
        let service = ConversationService::new(
            Arc::new(MeasuredStore::new(
                Arc::new(PgStore::new(db)),
                Arc::clone(&metrics),
            )),
            responder::from_settings(&settings.llm)?,
            settings.history_messages,
            Arc::clone(&metrics),
            Arc::new(idempotency.clone()),
        )
        .with_history_chars(settings.llm.history_chars);
        let listener = bind(settings.host, &settings.port)?;
        let port = listener.local_addr()?.port();
        let limiter = Arc::new(RateLimiter::new(
            settings.replicas.rate_limit_backend.clone(),
            settings.replicas.replicas,
            Arc::clone(&metrics),
        ));
        limiter.start().await;
        let state = app_state(service, &settings, None, sync, Some(Arc::clone(&limiter)));
        let draining = Arc::clone(&state.draining);
        let turns = state.turns.clone();
        let server = serve(
            listener,
            state,
            metrics,
            &settings,
            Some((Arc::clone(&authenticator), limiter)),
        )?;
        tracing::info!(
            mode = settings.mode.as_str(),
            address = %SocketAddr::new(settings.host, port),
            "maestra is serving"
        );
        Ok(Self {
            port,
            server,
            local: None,
            authenticator: Some(authenticator),
            background,
            draining,
            drain: settings.drain,
            turns,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server from elsewhere (tests; `serve` stops on SIGINT/SIGTERM).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGINT/SIGTERM; then reports not ready for the drain period, stops
    /// accepting, waits for the turns still running (those whose clients have gone included,
    /// waiting on the model provider) so that their replies are stored, and stops, letting
    /// other in-flight requests finish: all of it within `SHUTDOWN_GRACE_SECONDS` of the drain.
    pub async fn run_until_stopped(self) -> io::Result<()> {
        let handle = self.server.handle();
        let (draining, drain) = (Arc::clone(&self.draining), self.drain);
        let turns = self.turns.clone();
        let on_signal = tokio::spawn(async move {
            if let Err(e) = shutdown_signal().await {
                tracing::error!(error = %e, "cannot listen for shutdown signals");
                return;
            }
            draining.store(true, Ordering::Relaxed);
            tracing::info!(drain_seconds = drain.as_secs(), "shutting down");
            tokio::time::sleep(drain).await;
            // The workers run the turns: they stay up until the turns are done.
            handle.pause().await;
            let deadline = Instant::now()
                + Duration::from_secs(SHUTDOWN_GRACE_SECONDS - REQUEST_GRACE_SECONDS);
            let finished = finish_turns(&turns, deadline).await;
            handle.stop(finished).await;
        });
        let result = self.server.await;
        on_signal.abort();
        if let Some(authenticator) = &self.authenticator {
            authenticator.flush_last_used().await;
        }
        // Sync (local mode) stops before the store closes under it.
        self.background.stop();
        if let Some(local) = &self.local {
            let store = local.store.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || store.close()).await {
                tracing::error!(error = %e, "cannot close the store");
            }
        }
        tracing::info!("maestra stopped");
        result
    }
}

/// Waits (until `deadline`) for the turns still running, so that their replies are stored
/// before the workers stop; says whether they all ended. A turn still waiting at the deadline
/// keeps the user's message only.
async fn finish_turns(turns: &Turns, deadline: Instant) -> bool {
    let running = turns.running();
    if running == 0 {
        return true;
    }
    tracing::info!(turns = running, "waiting for turns still running");
    let finished = turns.wait_until_idle(deadline).await;
    if !finished {
        tracing::warn!(
            turns = turns.running(),
            "stopping with turns unfinished: their users' messages are stored, their replies are not"
        );
    }
    finished
}

/// SIGTERM (container platforms, systemd, launchd) or SIGINT (Ctrl-C).
async fn shutdown_signal() -> io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => Ok(()),
        interrupted = tokio::signal::ctrl_c() => interrupted,
    }
}

fn app_state(
    service: ConversationService,
    settings: &Settings,
    local_tenant: Option<String>,
    sync: SyncSide,
    rate_limiter: Option<Arc<RateLimiter>>,
) -> web::Data<AppState> {
    web::Data::new(AppState {
        service,
        mode: settings.mode,
        local_tenant,
        max_message_bytes: settings.max_message_bytes,
        started: Instant::now(),
        draining: Arc::new(AtomicBool::new(false)),
        metrics_token: settings.metrics_token.clone(),
        body_timeout: settings.body_timeout,
        sync,
        rate_limiter,
        turns: Turns::default(),
    })
}

fn serve(
    listener: TcpListener,
    state: web::Data<AppState>,
    metrics: Arc<Metrics>,
    settings: &Settings,
    cloud: Option<(Arc<Authenticator>, Arc<RateLimiter>)>,
) -> anyhow::Result<Server> {
    let max_message_bytes = settings.max_message_bytes;
    let cors_origins = settings.cors_origins.clone();
    let extension_ids = settings.cors_extension_ids.clone();
    let local = settings.mode == Mode::Local;
    let sync_quota = web::Data::new(SyncQuota(settings.sync.quota));
    let failure_quota = web::Data::new(FailureQuota::per_minute(settings.auth_failure_limit));
    let metrics = web::Data::from(metrics);
    let gate = cloud.is_some();
    let cloud = cloud.map(|(auth, limiter)| (web::Data::from(auth), web::Data::from(limiter)));
    let workers = http_workers();
    let started = Arc::new(AtomicUsize::new(0));
    let server = HttpServer::new(move || {
        // Called on each worker's thread as it starts (again if it restarts).
        db::enter_worker(started.fetch_add(1, Ordering::Relaxed) % workers);
        let mut app = App::new()
            .app_data(state.clone())
            .app_data(metrics.clone())
            .app_data(sync_quota.clone())
            .app_data(failure_quota.clone());
        if let Some((authenticator, limiter)) = &cloud {
            app = app
                .app_data(authenticator.clone())
                .app_data(limiter.clone());
        }
        app.configure(|cfg| api::configure(cfg, max_message_bytes, gate))
            .wrap(from_fn(middleware::body_deadline))
            .wrap(api::cors(&cors_origins, &extension_ids))
            .wrap(Condition::new(
                local,
                from_fn(middleware::loopback_host_only),
            ))
            .wrap(from_fn(middleware::request_context))
    })
    // Small writes (a stream's last event, short responses) go out at once instead of waiting
    // for the client's delayed ACK (Nagle).
    .on_connect(|connection, data| {
        if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
        // A client has this long to send its request head (slowloris headers are cut off).
        api::head_deadline::watch(connection, data, CLIENT_REQUEST_TIMEOUT);
    })
    .workers(workers)
    .shutdown_timeout(REQUEST_GRACE_SECONDS)
    // A backstop only: this timer's 408 has no body (head_deadline's has the JSON envelope).
    .client_request_timeout(CLIENT_REQUEST_TIMEOUT * 2)
    // Signals are handled in run_until_stopped, to drain before stopping.
    .disable_signals()
    .listen(listener)?
    .run();
    Ok(server)
}

/// actix-web's default: one HTTP worker thread per CPU the process may use (at most 512).
fn http_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, NonZeroUsize::get)
        .min(512)
}

/// Takes the data folder's lock, or says which server already holds it.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    let path = data_dir.join("maestra.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => {
            let port = fs::read_to_string(data_dir.join("maestra.port")).unwrap_or_default();
            bail!(
                "another maestra server is already using {} (port {}); stop it first or set MAESTRA_DATA_DIR",
                data_dir.display(),
                port.trim()
            )
        }
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Binds the configured port, or the first free one of the range.
pub fn bind(host: IpAddr, port: &PortChoice) -> anyhow::Result<TcpListener> {
    match port {
        PortChoice::Fixed(port) => listen((host, *port).into())
            .with_context(|| format!("MAESTRA_PORT: cannot listen on {host}:{port}")),
        PortChoice::FirstFree(range) => {
            for port in range.clone() {
                match listen((host, port).into()) {
                    Ok(listener) => return Ok(listener),
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot listen on {host}:{port}"));
                    }
                }
            }
            bail!(
                "every port from {} to {} on {host} is in use; free one or set MAESTRA_PORT",
                range.start(),
                range.end()
            )
        }
    }
}

/// A listening socket whose accept queue holds `LISTEN_BACKLOG` connections. std's
/// `TcpListener::bind` asks for 128, and `HttpServer::backlog` only applies to the addresses
/// actix binds itself: thousands of clients connecting at once overflowed the queue, and each
/// refused client waited a second for its SYN to be retried.
fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // As std does on Unix: a restarted server can bind its port again at once.
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Clients find the local server's port here. Written whole or not at all.
fn write_port_file(path: &Path, port: u16) -> anyhow::Result<()> {
    let temp = path.with_extension("port.tmp");
    let mut file =
        File::create(&temp).with_context(|| format!("cannot write {}", temp.display()))?;
    writeln!(file, "{port}")?;
    file.sync_all()?;
    fs::rename(&temp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
