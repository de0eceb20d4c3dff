//! `maestra sync`: link this machine's local server to a cloud, and see or run its sync.

use std::io::{IsTerminal, Read};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use secrecy::SecretString;

use super::one_shot_runtime;
use crate::client::ClientSettings;
use crate::domain::UserId;
use crate::sync::link::{self, CloudLink};
use crate::sync::local::{SyncError, call};
use crate::sync::protocol::{PullRequest, PullResponse};
use crate::sync::{SyncState, SyncStatus};

#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Link the local server to a cloud so that both hold the same conversations. The API key
    /// comes from MAESTRA_API_KEY, else from standard input (asked for without echo at a
    /// terminal), never from the command line; it is checked with the cloud, then kept in
    /// <data>/sync/cloud.json (mode 0600), where the local server reads it.
    Setup(SetupArgs),
    /// How sync stands, as the running local server tells it.
    Status(StatusArgs),
    /// Sync now and wait for the round to finish (exit 1 if it failed).
    Now(StatusArgs),
    /// Unlink: forget the cloud's URL and key. Nothing is deleted, here or in the cloud.
    Remove,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// The cloud's base URL, e.g. https://maestra.example.com
    #[arg(long)]
    url: String,
    /// A user whose conversations to sync (repeat for more); default: MAESTRA_USER_ID, else
    /// the OS user name. Users with conversations here are synced as well.
    #[arg(long = "user")]
    users: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(command: SyncCommand) -> anyhow::Result<()> {
    let _telemetry = super::client_logs()?;
    let settings = ClientSettings::from_env()?;
    let runtime = one_shot_runtime()?;
    match command {
        SyncCommand::Setup(args) => runtime.block_on(setup(&settings, args)),
        SyncCommand::Status(args) => runtime.block_on(status(&settings, args.json, false)),
        SyncCommand::Now(args) => runtime.block_on(status(&settings, args.json, true)),
        SyncCommand::Remove => {
            let data_dir = settings.data_dir()?;
            if CloudLink::remove(data_dir)? {
                println!("Sync unlinked: the local server no longer syncs (nothing was deleted).");
            } else {
                println!("Sync was not set up.");
            }
            Ok(())
        }
    }
}

async fn setup(settings: &ClientSettings, args: SetupArgs) -> anyhow::Result<()> {
    let data_dir = settings.data_dir()?.to_owned();
    let url = link::parse_url(&args.url).map_err(|e| anyhow!("--url: {e}"))?;
    let users = if args.users.is_empty() {
        vec![settings.user_or_default(None)?]
    } else {
        args.users
    };
    let users = users
        .iter()
        .map(|user| UserId::parse(user).map_err(|e| anyhow!("--user: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let api_key = read_key(&url)?;
    let link = CloudLink {
        url,
        api_key,
        users,
    };

    // Checked before anything is saved: the key, and that the cloud offers sync.
    let request = PullRequest {
        origin: link::origin(&data_dir)?,
        cursors: Default::default(),
        limit: Some(1),
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()?;
    let checked: Result<PullResponse, SyncError> =
        call(&http, &link, "/api/maestra/sync/pull", &request).await;
    match checked {
        Ok(_) => {}
        Err(SyncError::Unauthorized) => {
            bail!(
                "the cloud at {} refused this API key; nothing was saved",
                link.url
            )
        }
        Err(e) => bail!("{e}; nothing was saved"),
    }
    link.save(&data_dir)?;

    let names: Vec<&str> = link.users.iter().map(UserId::as_str).collect();
    println!(
        "Sync set up with {} for {}. The key is kept in {} (readable by you only).",
        link.url,
        names.join(", "),
        link::sync_dir(&data_dir).join("cloud.json").display()
    );
    // A running local server starts at once; one started later picks the link up.
    match local_status(settings, true, Duration::from_secs(10)).await {
        Ok(status) => println!("{}", describe(&status)),
        Err(_) => println!(
            "The local server is not running: it syncs once started (`maestra serve` or `maestra install`)."
        ),
    }
    Ok(())
}

/// The key: `MAESTRA_API_KEY`, else standard input.
fn read_key(url: &reqwest::Url) -> anyhow::Result<SecretString> {
    if let Some(key) = settings_key() {
        return Ok(key);
    }
    let key = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("API key for {url}: "))
            .context("cannot read the API key")?
    } else {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the API key from standard input")?;
        text
    };
    let key = key.trim();
    if key.is_empty() {
        bail!("no API key: set MAESTRA_API_KEY or give it on standard input");
    }
    Ok(SecretString::from(key.to_owned()))
}

fn settings_key() -> Option<SecretString> {
    std::env::var("MAESTRA_API_KEY")
        .ok()
        .map(|key| key.trim().to_owned())
        .filter(|key| !key.is_empty())
        .map(SecretString::from)
}

async fn status(settings: &ClientSettings, json: bool, now: bool) -> anyhow::Result<()> {
    let timeout = if now {
        Duration::from_secs(90)
    } else {
        Duration::from_secs(5)
    };
    let status = match local_status(settings, now, timeout).await {
        Ok(status) => status,
        Err(e) => {
            let linked = CloudLink::load(settings.data_dir()?)?;
            let saved = match linked {
                Some((link, _)) => format!("sync is set up with {}", link.url),
                None => "sync is not set up (`maestra sync setup --url URL`)".to_owned(),
            };
            bail!("{e}; {saved}");
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("{}", describe(&status));
    }
    if now && status.state != SyncState::Ok {
        bail!(
            "sync did not complete: {}",
            status
                .error
                .as_deref()
                .unwrap_or("no round finished in time")
        );
    }
    Ok(())
}

/// The running local server's sync status (after a round, with `now`).
async fn local_status(
    settings: &ClientSettings,
    now: bool,
    timeout: Duration,
) -> anyhow::Result<SyncStatus> {
    let mut url = settings.local_url.clone();
    let base = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!(
        "{base}/api/maestra/sync{}",
        if now { "/now" } else { "" }
    ));
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .build()?;
    let request = if now { http.post(url) } else { http.get(url) };
    let response = request.send().await.map_err(|e| {
        anyhow!(
            "cannot reach the local server at {} ({})",
            settings.local_url,
            e.without_url()
        )
    })?;
    if !response.status().is_success() {
        bail!(
            "the local server at {} answered {}",
            settings.local_url,
            response.status()
        );
    }
    Ok(response.json().await?)
}

/// One line for a person.
fn describe(status: &SyncStatus) -> String {
    let state = serde_json::to_value(status.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut line = format!("sync: {state}");
    if let Some(url) = &status.url {
        line.push_str(&format!(" with {url}"));
    }
    match status.last_success {
        Some(at) => line.push_str(&format!(
            "; last synced {}",
            at.format("%Y-%m-%d %H:%M:%S UTC")
        )),
        None if status.state != SyncState::Off && status.state != SyncState::NotSetUp => {
            line.push_str("; not synced yet")
        }
        None => {}
    }
    line.push_str(&format!(
        "; {} pending; {} sent and {} received since the server started",
        status.pending, status.pushed, status.pulled
    ));
    if let Some(error) = &status.error {
        line.push_str(&format!("\n  last error: {error}"));
    }
    line
}
