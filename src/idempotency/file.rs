//! Local mode's idempotency records: one small JSON file per key under `<data>/idempotency/`,
//! replaced whole (write, fsync, rename) at each step. Records older than 24 h are removed at
//! start and ignored after.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Begin, IdempotencyKey, IdempotencyStore, LEASE, RETENTION};
use crate::domain::ConversationId;
use crate::domain::TurnOutcome;
use crate::store::{StoreError, create_private_dir};

#[derive(Clone)]
pub struct FileIdempotency {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Serialises the steps of one key (in-process: one server per data folder).
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Records released while their release could not be written (a full disk): their lease
    /// is over all the same, so that a retry need not wait for it.
    released: Mutex<HashSet<PathBuf>>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    fingerprint: String,
    created_at: DateTime<Utc>,
    locked_until: Option<DateTime<Utc>>,
    conversation_id: Option<ConversationId>,
    user_seq: Option<i64>,
    outcome: Option<TurnOutcome>,
}

fn expired(created_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    chrono::Duration::from_std(RETENTION).is_ok_and(|retention| created_at + retention <= now)
}

impl FileIdempotency {
    /// Opens (creating, mode 0700) the folder and removes records older than 24 h.
    pub fn open(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        create_private_dir(&dir)?;
        let now = Utc::now();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let stale = fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok())
                .is_none_or(|record| expired(record.created_at, now));
            if stale {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                locks: Mutex::new(HashMap::new()),
                released: Mutex::new(HashSet::new()),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        work: impl FnOnce(&Inner, PathBuf, &IdempotencyKey) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        let key = key.clone();
        let name: String = Sha256::digest(format!("{tenant}\n{}", key.key()).as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        tokio::task::spawn_blocking(move || {
            let lock = Arc::clone(
                inner
                    .locks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(name.clone())
                    .or_default(),
            );
            let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
            let path = inner.dir.join(format!("{name}.json"));
            work(&inner, path, &key)
        })
        .await
        .map_err(|e| StoreError::Other(anyhow!("idempotency task failed: {e}")))?
    }
}

fn read(path: &PathBuf) -> Result<Option<Record>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the record whole: a crash leaves the old one or the new one, never half.
fn write(inner: &Inner, path: &PathBuf, record: &Record) -> Result<(), StoreError> {
    let temp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(record).context("cannot encode an idempotency record")?;
    let written = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(&bytes)?;
            file.sync_data()
        })
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = written {
        // E.g. a full disk: no half-written record is left behind.
        let _ = fs::remove_file(&temp);
        return Err(e.into());
    }
    File::open(&inner.dir)?.sync_all()?;
    Ok(())
}

fn update(
    inner: &Inner,
    path: &PathBuf,
    change: impl FnOnce(&mut Record),
) -> Result<(), StoreError> {
    match read(path)? {
        Some(mut record) => {
            change(&mut record);
            write(inner, path, &record)
        }
        None => Ok(()),
    }
}

#[async_trait]
impl IdempotencyStore for FileIdempotency {
    async fn begin(&self, tenant: &str, key: &IdempotencyKey) -> Result<Begin, StoreError> {
        self.blocking(tenant, key, |inner, path, key| {
            let now = Utc::now();
            let lease = chrono::Duration::from_std(LEASE).unwrap_or_default();
            let (begin, record) = match read(&path)? {
                Some(record) if !expired(record.created_at, now) => {
                    if record.fingerprint != key.fingerprint() {
                        return Ok(Begin::Conflict);
                    }
                    if let Some(outcome) = record.outcome {
                        return Ok(Begin::Replay(Box::new(outcome)));
                    }
                    let released = inner
                        .released
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&path);
                    if !released && record.locked_until.is_some_and(|until| until > now) {
                        return Ok(Begin::InProgress);
                    }
                    let begin = match (&record.conversation_id, record.user_seq) {
                        (Some(conversation_id), Some(user_seq)) => Begin::Resume {
                            conversation_id: conversation_id.clone(),
                            user_seq,
                        },
                        _ => Begin::Fresh,
                    };
                    (
                        begin,
                        Record {
                            locked_until: Some(now + lease),
                            ..record
                        },
                    )
                }
                _ => (
                    Begin::Fresh,
                    Record {
                        fingerprint: key.fingerprint().to_owned(),
                        created_at: now,
                        locked_until: Some(now + lease),
                        conversation_id: None,
                        user_seq: None,
                        outcome: None,
                    },
                ),
            };
            write(inner, &path, &record)?;
            inner
                .released
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&path);
            Ok(begin)
        })
        .await
    }

    async fn user_stored(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        conversation: &ConversationId,
        seq: i64,
    ) -> Result<(), StoreError> {
        let conversation = conversation.clone();
        self.blocking(tenant, key, move |inner, path, _| {
            update(inner, &path, |record| {
                record.conversation_id = Some(conversation);
                record.user_seq = Some(seq);
            })
        })
        .await
    }

    async fn complete(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        outcome: &TurnOutcome,
    ) -> Result<(), StoreError> {
        let outcome = outcome.clone();
        self.blocking(tenant, key, move |inner, path, _| {
            update(inner, &path, |record| {
                record.outcome = Some(outcome);
                record.locked_until = None;
            })
        })
        .await
    }

    async fn release(&self, tenant: &str, key: &IdempotencyKey) -> Result<(), StoreError> {
        self.blocking(tenant, key, |inner, path, _| {
            let released = update(inner, &path, |record| record.locked_until = None);
            if released.is_err() {
                inner
                    .released
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(path);
            }
            released
        })
        .await
    }
}
