//! The local server's side of sync: a background task that sends the cloud what was written
//! here and brings what was written elsewhere. It is never in a turn's way: a turn writes to
//! the local store and answers; sync reads the store's files afterwards.
//!
//! A round: look at which conversation files grew since they were last sent (so the pending
//! count is known even offline), pull each user's feed from the cloud and apply it, then push
//! what was written here. Positions are saved (`<data>/sync/state.json`) only after what they
//! cover is durable on the side that received it, so a crash anywhere means sending or
//! receiving some records again, which both sides recognise by message id.
//!
//! Rounds run when something is written here (after a short pause, to gather a burst), every
//! `interval`, when `maestra sync now` asks, and before a conversation is read. A failed round
//! waits longer each time (doubling, with jitter, up to `interval` while the cloud does not
//! answer at all, up to five minutes while it answers with failures); a refused key (401/403)
//! stops sync until `maestra sync setup` saves another.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::link::{self, CloudLink};
use super::protocol::{CLOUD_ORIGIN, PullRequest, PullResponse, PushRequest, PushResponse, Record};
use crate::config::SyncSettings;
use crate::domain::{ConversationId, Message, OriginId, UserId};
use crate::metrics::Metrics;
use crate::store::deletions::Deletion;
use crate::store::{FileCursor, FileStore, Owner, StoreError};

/// A push carries at most this many bytes of records (well under the cloud's limit).
const MAX_PUSH_BYTES: usize = 2 << 20;
/// Writes made within this pause are sent together.
const GATHER: Duration = Duration::from_millis(100);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading a conversation waits for a round to bring the cloud's news.
pub const READ_WAIT: Duration = Duration::from_secs(1);

/// What `/health`, `/api/maestra/sync` and `maestra sync status` tell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub state: SyncState,
    /// The cloud synced with (no credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Whether the cloud answered the last attempt (none yet: null).
    pub reachable: Option<bool>,
    /// Records written here that the cloud does not have yet.
    pub pending: u64,
    pub last_success: Option<DateTime<Utc>>,
    /// Why the last round failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Records sent and received since this server started.
    pub pushed: u64,
    pub pulled: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// `MAESTRA_SYNC=off`.
    Off,
    /// No cloud linked (`maestra sync setup` links one).
    NotSetUp,
    /// Linked; the first round has not finished.
    Starting,
    /// The last round completed.
    Ok,
    /// The cloud could not be reached or failed (5xx, 429): retrying with backoff.
    Offline,
    /// The cloud refused the key: stopped until `maestra sync setup` saves another.
    Unauthorized,
    /// Something else went wrong (see `error`): retrying with backoff.
    Error,
}

impl SyncStatus {
    fn new(state: SyncState) -> Self {
        Self {
            state,
            url: None,
            reachable: None,
            pending: 0,
            last_success: None,
            error: None,
            pushed: 0,
            pulled: 0,
        }
    }
}

/// How far sync has got with the cloud; saved after what it covers is durable.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The cloud these positions are for: another one starts over.
    #[serde(default)]
    cloud: Option<String>,
    /// Per user: the position in the cloud's feed read up to.
    #[serde(default)]
    pulled: BTreeMap<UserId, i64>,
    /// Per conversation: how far its file has been sent.
    #[serde(default)]
    pushed: BTreeMap<ConversationId, FileCursor>,
    /// How far the record of deletions has been sent.
    #[serde(default)]
    deletions_pushed: u64,
    #[serde(default)]
    last_success: Option<DateTime<Utc>>,
}

impl State {
    fn path(data_dir: &Path) -> PathBuf {
        link::sync_dir(data_dir).join("state.json")
    }

    fn load(data_dir: &Path) -> State {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                // Only positions are lost: everything is sent and received again, once.
                tracing::warn!(error = %e, file = %path.display(), "sync state unreadable; starting over");
                State::default()
            }),
            Err(_) => State::default(),
        }
    }

    fn save(&self, data_dir: &Path) -> Result<(), SyncError> {
        let bytes = serde_json::to_vec(self).map_err(|e| SyncError::Local(e.to_string()))?;
        link::write_atomically(&Self::path(data_dir), &bytes)
            .map_err(|e| SyncError::Local(format!("cannot save the sync state: {e}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// No answer at all (refused, timed out): costs the cloud nothing, so retried at the pace
    /// of an idle round.
    #[error("{0}")]
    Unreachable(String),
    /// The cloud answered with a failure (5xx, a cut-off answer): retried with full backoff.
    #[error("{0}")]
    Offline(String),
    #[error("the cloud refused the API key; run `maestra sync setup` with a valid key")]
    Unauthorized,
    #[error("the cloud's sync quota is used up; retrying in {} s", .0.as_secs())]
    RateLimited(Duration),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Local(String),
}

impl From<StoreError> for SyncError {
    fn from(e: StoreError) -> Self {
        SyncError::Local(format!("local store: {e}"))
    }
}

impl SyncError {
    fn reason(&self) -> &'static str {
        match self {
            SyncError::Unreachable(_) | SyncError::Offline(_) => "unreachable",
            SyncError::Unauthorized => "unauthorized",
            SyncError::RateLimited(_) => "rate_limited",
            SyncError::Refused(_) => "refused",
            SyncError::Local(_) => "local",
        }
    }
}

/// A handle on the sync task of a local server.
#[derive(Clone)]
pub struct LocalSync {
    engine: Arc<Engine>,
}

struct Engine {
    data_dir: PathBuf,
    store: FileStore,
    settings: SyncSettings,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    origin: OriginId,
    status: Mutex<SyncStatus>,
    /// Raised by `now` and by reads: run a round without waiting for the interval.
    asked: Notify,
    /// Rounds started and finished, for those waiting on one.
    rounds: watch::Sender<Rounds>,
    /// The users who have conversations here, found at start and while sending.
    users: Mutex<BTreeSet<UserId>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Rounds {
    started: u64,
    finished: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One conversation's (or the deletions') records to send, and the position once sent.
struct Outgoing {
    records: Vec<Record>,
    sent: Sent,
}

enum Sent {
    Conversation(ConversationId, FileCursor),
    Deletions(u64),
}

impl LocalSync {
    /// The sync of the local server whose data folder is `data_dir`. Nothing runs before
    /// `run`.
    pub fn new(
        data_dir: &Path,
        store: FileStore,
        settings: SyncSettings,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        let state = if settings.enabled {
            SyncState::NotSetUp
        } else {
            SyncState::Off
        };
        Ok(Self {
            engine: Arc::new(Engine {
                data_dir: data_dir.to_owned(),
                store,
                origin: link::origin(data_dir)?,
                settings,
                metrics,
                http,
                status: Mutex::new(SyncStatus::new(state)),
                asked: Notify::new(),
                rounds: watch::Sender::new(Rounds::default()),
                users: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    pub fn status(&self) -> SyncStatus {
        lock(&self.engine.status).clone()
    }

    /// Runs a round now (whatever the backoff) and answers once it is done, or after
    /// `timeout` with how things stand.
    pub async fn now(&self, timeout: Duration) -> SyncStatus {
        let mut rounds = self.engine.rounds.subscribe();
        // A round under way may have looked before this call: the next one to start counts.
        let wanted = rounds.borrow_and_update().started + 1;
        if self.status().state != SyncState::Off {
            self.engine.asked.notify_one();
            let _ = tokio::time::timeout(timeout, rounds.wait_for(|r| r.finished >= wanted)).await;
        }
        self.status()
    }

    /// Before a conversation is read: brings the cloud's news first, if the cloud answers
    /// (waiting at most `READ_WAIT`); otherwise the read goes on at once.
    pub async fn refresh(&self) {
        if self.status().state == SyncState::Ok {
            self.now(READ_WAIT).await;
        }
    }

    /// The sync task: runs until the server stops.
    pub async fn run(self) {
        let engine = self.engine;
        if !engine.settings.enabled {
            return;
        }
        let known = engine.store.clone();
        match tokio::task::spawn_blocking(move || known.owners()).await {
            Ok(Ok(owners)) => lock(&engine.users).extend(owners),
            Ok(Err(e)) => tracing::warn!(error = %e, "sync: cannot list the local users"),
            Err(e) => tracing::warn!(error = %e, "sync: cannot list the local users"),
        }
        let mut state = State::load(&engine.data_dir);
        let mut failures = 0u32;
        let mut refused_link: Option<SystemTime> = None;
        let mut due = Instant::now();
        loop {
            let asked = tokio::select! {
                () = tokio::time::sleep_until(due.into()) => false,
                () = engine.asked.notified() => true,
                () = engine.store.changed() => {
                    // Gather a burst of writes; while failing, wait for the retry instead.
                    if failures > 0 {
                        continue;
                    }
                    tokio::time::sleep(GATHER).await;
                    false
                }
            };
            engine.rounds.send_modify(|r| r.started += 1);
            let outcome = engine.round(&mut state, &mut refused_link, asked).await;
            match outcome {
                Ok(()) => {
                    failures = 0;
                    due = Instant::now() + engine.settings.interval;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = match &e {
                        SyncError::RateLimited(wait) => *wait,
                        // Nothing to retry until the key is replaced: look for a new one.
                        SyncError::Unauthorized => engine.settings.interval,
                        // A cloud that does not answer is asked again no more often than an
                        // idle install asks anyway, so that it is caught up soon after it is
                        // back; one that answers with failures is given room.
                        SyncError::Unreachable(_) => backoff(failures, engine.settings.interval),
                        _ => backoff(failures, LONGEST_RETRY),
                    };
                    due = Instant::now() + wait;
                    engine.failed(&e);
                }
            }
            engine.rounds.send_modify(|r| r.finished = r.started);
        }
    }
}

/// The wait before the next attempt after `failures` failed ones in a row: doubling from one
/// second up to `longest`, each drawn between half and all of it, so that many installs
/// coming back at once do not retry in step.
fn backoff(failures: u32, longest: Duration) -> Duration {
    let full = FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(longest)
        .max(FIRST_RETRY);
    let mut random = [0u8; 2];
    let fraction = match getrandom::fill(&mut random) {
        Ok(()) => f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX),
        Err(_) => 1.0,
    };
    full.mul_f64(0.5 + fraction / 2.0)
}

impl Engine {
    /// One round with the linked cloud (or nothing, when none is linked).
    async fn round(
        &self,
        state: &mut State,
        refused_link: &mut Option<SystemTime>,
        asked: bool,
    ) -> Result<(), SyncError> {
        let loaded = CloudLink::load(&self.data_dir).map_err(|e| SyncError::Local(e.to_string()));
        let (link, saved) = match loaded {
            Ok(Some(found)) => found,
            Ok(None) => {
                self.set_state(SyncState::NotSetUp, None);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if state.cloud.as_deref() != Some(link.url.as_str()) {
            *state = State {
                cloud: Some(link.url.to_string()),
                ..State::default()
            };
        }
        {
            let mut status = lock(&self.status);
            status.url = Some(link.url.to_string());
            if matches!(status.state, SyncState::NotSetUp | SyncState::Off) {
                status.state = SyncState::Starting;
            }
        }
        lock(&self.users).extend(link.users.iter().cloned());

        let outgoing = self.outgoing(state).await?;
        let pending: usize = outgoing.iter().map(|o| o.records.len()).sum();
        self.set_pending(pending as u64);
        // A refused key is not tried again until another is saved (or sync is asked for).
        if *refused_link == Some(saved) && !asked {
            return Err(SyncError::Unauthorized);
        }

        let result = async {
            self.pull(&link, state).await?;
            self.push(&link, state, outgoing).await
        }
        .await;
        match result {
            Ok(()) => {
                *refused_link = None;
                let now = Utc::now();
                state.last_success = Some(now);
                state.save(&self.data_dir)?;
                let mut status = lock(&self.status);
                status.state = SyncState::Ok;
                status.reachable = Some(true);
                status.last_success = Some(now);
                status.error = None;
                status.pending = 0;
                drop(status);
                self.metrics.sync_pending.set(0);
                self.metrics.sync_lag.set(0.0);
                Ok(())
            }
            Err(e) => {
                if matches!(e, SyncError::Unauthorized) {
                    *refused_link = Some(saved);
                }
                Err(e)
            }
        }
    }

    fn set_state(&self, state: SyncState, error: Option<String>) {
        let mut status = lock(&self.status);
        status.state = state;
        status.error = error;
    }

    fn set_pending(&self, pending: u64) {
        lock(&self.status).pending = pending;
        self.metrics
            .sync_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    fn failed(&self, e: &SyncError) {
        self.metrics
            .sync_failures
            .with_label_values(&[e.reason()])
            .inc();
        let state = match e {
            SyncError::Unreachable(_) | SyncError::Offline(_) | SyncError::RateLimited(_) => {
                SyncState::Offline
            }
            SyncError::Unauthorized => SyncState::Unauthorized,
            SyncError::Refused(_) | SyncError::Local(_) => SyncState::Error,
        };
        let mut status = lock(&self.status);
        if status.state != state || status.error.as_deref() != Some(&e.to_string()) {
            // Once per change of state, not once per retry.
            tracing::warn!(reason = e.reason(), error = %e, "sync with the cloud failed; retrying later");
        }
        status.state = state;
        status.reachable = Some(!matches!(
            e,
            SyncError::Unreachable(_) | SyncError::Offline(_)
        ));
        status.error = Some(e.to_string());
        if let Some(last) = status.last_success {
            let lag = (Utc::now() - last).num_milliseconds() as f64 / 1000.0;
            self.metrics.sync_lag.set(lag);
        }
    }

    /// What was written here and is not in the cloud yet: each conversation file that grew
    /// since it was last sent, and deletions made here.
    async fn outgoing(&self, state: &State) -> Result<Vec<Outgoing>, SyncError> {
        let store = self.store.clone();
        let pushed = state.pushed.clone();
        let deletions_pushed = state.deletions_pushed;
        let (outgoing, owners) =
            tokio::task::spawn_blocking(move || scan(&store, &pushed, deletions_pushed))
                .await
                .map_err(|e| SyncError::Local(format!("sync scan failed: {e}")))??;
        lock(&self.users).extend(owners);
        Ok(outgoing)
    }

    async fn pull(&self, link: &CloudLink, state: &mut State) -> Result<(), SyncError> {
        let users: Vec<UserId> = lock(&self.users).iter().cloned().collect();
        if users.is_empty() {
            return Ok(());
        }
        loop {
            let request = PullRequest {
                origin: self.origin.clone(),
                cursors: users
                    .iter()
                    .map(|user| (user.clone(), state.pulled.get(user).copied().unwrap_or(0)))
                    .collect(),
                limit: Some(self.settings.batch),
            };
            let response: PullResponse =
                self.call(link, "/api/maestra/sync/pull", &request).await?;
            let count = response.records.len() as u64;
            self.apply(response.records).await?;
            state.pulled.extend(response.cursors);
            state.save(&self.data_dir)?;
            self.metrics
                .sync_records
                .with_label_values(&["pulled"])
                .inc_by(count);
            lock(&self.status).pulled += count;
            if !response.more {
                return Ok(());
            }
        }
    }

    /// Stores pulled records, each conversation's in their order (a deletion after the
    /// messages before it).
    async fn apply(&self, records: Vec<Record>) -> Result<(), SyncError> {
        let mut waiting: HashMap<(UserId, ConversationId), Vec<Message>> = HashMap::new();
        for record in records {
            match record {
                record @ Record::Message { .. } => {
                    if let Some((user, conversation, message)) = record.into_message() {
                        waiting
                            .entry((user, conversation))
                            .or_default()
                            .push(message);
                    }
                }
                Record::Deletion {
                    user_id,
                    conversation_id,
                    deleted_at,
                    origin,
                } => {
                    let key = (user_id, conversation_id);
                    if let Some(messages) = waiting.remove(&key) {
                        self.store_messages(&key, messages).await?;
                    }
                    let (user_id, conversation_id) = key;
                    self.store
                        .apply_remote_deletion(Deletion {
                            conversation_id,
                            user_id,
                            deleted_at,
                            origin: Some(origin.unwrap_or_else(|| CLOUD_ORIGIN.to_owned())),
                        })
                        .await?;
                }
            }
        }
        for (key, messages) in waiting {
            self.store_messages(&key, messages).await?;
        }
        Ok(())
    }

    async fn store_messages(
        &self,
        (user, conversation): &(UserId, ConversationId),
        messages: Vec<Message>,
    ) -> Result<(), SyncError> {
        let owner = Owner {
            tenant: crate::startup::LOCAL_TENANT.to_owned(),
            user_id: user.clone(),
        };
        match self
            .store
            .apply_remote(&owner, conversation, messages)
            .await
        {
            Ok(_) => Ok(()),
            // One file per id here: another local user has a conversation by that id. Theirs
            // stays; this one stays in the cloud only.
            Err(StoreError::NotFound) => {
                tracing::warn!(
                    conversation.id = %conversation,
                    user.id = %user,
                    "sync: this conversation id is another local user's; kept in the cloud only"
                );
                self.metrics
                    .sync_failures
                    .with_label_values(&["id_taken"])
                    .inc();
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn push(
        &self,
        link: &CloudLink,
        state: &mut State,
        outgoing: Vec<Outgoing>,
    ) -> Result<(), SyncError> {
        let mut batch: Vec<Record> = Vec::new();
        let mut batch_bytes = 0;
        // Positions to save once the batch holding the last of their records is stored.
        let mut done: Vec<Sent> = Vec::new();
        let mut remaining = outgoing.iter().map(|o| o.records.len()).sum::<usize>();
        for Outgoing { records, sent } in outgoing {
            for record in records {
                let size = serde_json::to_vec(&record).map_or(0, |bytes| bytes.len());
                if !batch.is_empty()
                    && (batch.len() >= self.settings.batch || batch_bytes + size > MAX_PUSH_BYTES)
                {
                    remaining -= batch.len();
                    self.send(link, std::mem::take(&mut batch)).await?;
                    batch_bytes = 0;
                    self.sent(state, std::mem::take(&mut done), remaining)?;
                }
                batch_bytes += size;
                batch.push(record);
            }
            done.push(sent);
        }
        if !batch.is_empty() {
            self.send(link, batch).await?;
        }
        self.sent(state, done, 0)
    }

    async fn send(&self, link: &CloudLink, records: Vec<Record>) -> Result<(), SyncError> {
        let count = records.len() as u64;
        let request = PushRequest {
            origin: self.origin.clone(),
            records,
        };
        let _: PushResponse = self.call(link, "/api/maestra/sync/push", &request).await?;
        self.metrics
            .sync_records
            .with_label_values(&["pushed"])
            .inc_by(count);
        lock(&self.status).pushed += count;
        Ok(())
    }

    /// Saves the positions of what the cloud now holds.
    fn sent(&self, state: &mut State, done: Vec<Sent>, remaining: usize) -> Result<(), SyncError> {
        for sent in done {
            match sent {
                Sent::Conversation(conversation, cursor) => {
                    state.pushed.insert(conversation, cursor);
                }
                Sent::Deletions(offset) => state.deletions_pushed = offset,
            }
        }
        self.set_pending(remaining as u64);
        state.save(&self.data_dir)
    }

    async fn call<T: Serialize, R: DeserializeOwned>(
        &self,
        link: &CloudLink,
        path: &str,
        body: &T,
    ) -> Result<R, SyncError> {
        call(&self.http, link, path, body).await
    }
}

/// One request to the cloud's sync API, its failure sorted by what to do about it.
pub async fn call<T: Serialize, R: DeserializeOwned>(
    http: &reqwest::Client,
    link: &CloudLink,
    path: &str,
    body: &T,
) -> Result<R, SyncError> {
    let response = http
        .post(link.endpoint(path))
        .bearer_auth(link.api_key.expose_secret())
        .json(body)
        .send()
        .await
        .map_err(|e| {
            SyncError::Unreachable(format!(
                "cannot reach the cloud at {}: {}",
                link.url,
                e.without_url()
            ))
        })?;
    let status = response.status();
    if status.is_success() {
        return response.json().await.map_err(|e| {
            SyncError::Offline(format!(
                "the cloud's answer was cut off: {}",
                e.without_url()
            ))
        });
    }
    match status.as_u16() {
        401 | 403 => Err(SyncError::Unauthorized),
        429 => {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(FIRST_RETRY, Duration::from_secs);
            Err(SyncError::RateLimited(wait))
        }
        code if code >= 500 => Err(SyncError::Offline(format!("the cloud answered {status}"))),
        _ => {
            let message = response
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|body| body["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_default();
            Err(SyncError::Refused(format!(
                "the cloud refused sync ({status}): {message}"
            )))
        }
    }
}

/// See `Engine::outgoing`; also returns the owners of the conversations looked at.
fn scan(
    store: &FileStore,
    pushed: &BTreeMap<ConversationId, FileCursor>,
    deletions_pushed: u64,
) -> Result<(Vec<Outgoing>, BTreeSet<UserId>), StoreError> {
    let mut outgoing = Vec::new();
    let mut owners = BTreeSet::new();
    let (deletions, end) = store.deletions().since(deletions_pushed)?;
    if end != deletions_pushed {
        outgoing.push(Outgoing {
            records: deletions
                .into_iter()
                .filter(|d| d.origin.is_none())
                .map(Record::of_deletion)
                .collect(),
            sent: Sent::Deletions(end),
        });
    }
    for (conversation, len) in store.conversation_files()? {
        let from = pushed.get(&conversation).cloned().unwrap_or_default();
        if from.bytes == len {
            continue;
        }
        let Some((owner, messages, cursor)) = store.written_here(&conversation, &from)? else {
            continue;
        };
        let mut records = Vec::with_capacity(messages.len());
        for message in messages {
            match Record::of_message(owner.clone(), conversation.clone(), message) {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::warn!(conversation.id = %conversation, error = %e, "sync: a message that cannot be sent")
                }
            }
        }
        owners.insert(owner);
        outgoing.push(Outgoing {
            records,
            sent: Sent::Conversation(conversation, cursor),
        });
    }
    Ok((outgoing, owners))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_five_minutes_and_are_spread() {
        for failures in 1..=20 {
            let full = FIRST_RETRY
                .saturating_mul(1 << (failures - 1).min(16))
                .min(LONGEST_RETRY);
            let wait = backoff(failures, LONGEST_RETRY);
            assert!(wait >= full / 2 && wait <= full, "{failures}: {wait:?}");
        }
        let spread: BTreeSet<Duration> = (0..20).map(|_| backoff(10, LONGEST_RETRY)).collect();
        assert!(spread.len() > 1, "jitter");
    }

    #[test]
    fn an_unreachable_cloud_is_retried_within_the_interval() {
        let interval = Duration::from_secs(5);
        for failures in 1..=20 {
            let wait = backoff(failures, interval);
            assert!(wait <= interval, "{failures}: {wait:?}");
        }
        let spread: BTreeSet<Duration> = (0..20).map(|_| backoff(10, interval)).collect();
        assert!(spread.len() > 1, "jitter");
    }
}
