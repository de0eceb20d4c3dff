//! Builds the whole service from `Settings`, binds its port, then runs it. `maestra serve` and
//! the tests start the same `Application`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use actix_web::dev::Server;
use actix_web::middleware::{Condition, from_fn};
use actix_web::{App, HttpServer, web};
use anyhow::{Context, bail};

use crate::api::{self, AppState, middleware};
use crate::config::{Mode, PortChoice, Settings};
use crate::responder;
use crate::service::ConversationService;
use crate::store::FileStore;
use crate::usage_log::UsageLog;

/// The tenant of every local-mode conversation.
pub const LOCAL_TENANT: &str = "local";
/// How long in-flight requests may take to finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE_SECONDS: u64 = 30;

pub struct Application {
    port: u16,
    server: Server,
    /// Held while serving: one server per data folder.
    _data_lock: File,
    port_file: PathBuf,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        match settings.mode {
            Mode::Local => Self::build_local(settings),
        }
    }

    fn build_local(settings: Settings) -> anyhow::Result<Self> {
        let data_dir = &settings.data_dir;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .with_context(|| format!("cannot create the data folder {}", data_dir.display()))?;
        let data_lock = lock_data_dir(data_dir)?;

        let store = FileStore::open(data_dir.join("conversations"), settings.history_messages)?;
        let usage_log = UsageLog::open(&data_dir.join("maestra_metrics.jsonl"))?;
        let service = ConversationService::new(
            Arc::new(store),
            responder::from_settings(&settings.llm)?,
            Some(usage_log),
            settings.history_messages,
        )
        .with_history_chars(settings.llm.history_chars);

        let listener = bind(settings.host, &settings.port)?;
        let port = listener.local_addr()?.port();
        let port_file = data_dir.join("maestra.port");
        write_port_file(&port_file, port)?;

        let state = web::Data::new(AppState {
            service,
            mode: settings.mode,
            tenant: LOCAL_TENANT.to_owned(),
            max_message_bytes: settings.max_message_bytes,
            started: Instant::now(),
        });
        let server = serve(listener, state, &settings)?;
        tracing::info!(
            mode = settings.mode.as_str(),
            address = %SocketAddr::new(settings.host, port),
            data_dir = %data_dir.display(),
            "maestra is serving"
        );
        Ok(Self {
            port,
            server,
            _data_lock: data_lock,
            port_file,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGINT/SIGTERM, then lets in-flight requests finish.
    pub async fn run_until_stopped(self) -> io::Result<()> {
        let result = self.server.await;
        if fs::read_to_string(&self.port_file).is_ok_and(|p| p.trim() == self.port.to_string()) {
            let _ = fs::remove_file(&self.port_file);
        }
        tracing::info!("maestra stopped");
        result
    }
}

fn serve(
    listener: TcpListener,
    state: web::Data<AppState>,
    settings: &Settings,
) -> anyhow::Result<Server> {
    let max_message_bytes = settings.max_message_bytes;
    let cors_origins = settings.cors_origins.clone();
    let local = settings.mode == Mode::Local;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(|cfg| api::configure(cfg, max_message_bytes))
            .wrap(api::cors(&cors_origins))
            .wrap(Condition::new(
                local,
                from_fn(middleware::loopback_host_only),
            ))
            .wrap(from_fn(middleware::request_context))
    })
    .shutdown_timeout(SHUTDOWN_GRACE_SECONDS)
    .listen(listener)?
    .run();
    Ok(server)
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
        PortChoice::Fixed(port) => TcpListener::bind((host, *port))
            .with_context(|| format!("MAESTRA_PORT: cannot listen on {host}:{port}")),
        PortChoice::FirstFree(range) => {
            for port in range.clone() {
                match TcpListener::bind((host, port)) {
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
