//! Local mode's idempotency records: one small JSON file per key under `<data>/idempotency/`,
//! written through the local store's journal as riders ([`FileStore::keep_idempotency_record`]):
//! a record costs no flush of its own, and is journaled with the next write of a message (the
//! reply that follows, or the next request's) or at a clean stop; its file is not flushed at
//! checkpoints either. A crash may lose the latest records (a power cut, any; one it left
//! unreadable counts as none). What they guard is still kept, since a keyed turn's messages
//! have ids derived from the key ([`IdempotencyKey::derived_ids`]): a retry finds its message,
//! and its reply, in the conversation instead of storing them again. The records written in
//! this run are read from memory; the files hold those of earlier runs. Records older than
//! 24 h are removed at start and ignored after.

use std::collections::HashMap;
use std::fs;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Begin, IdempotencyKey, IdempotencyStore, LEASE, RETENTION};
use crate::domain::ConversationId;
use crate::domain::TurnOutcome;
use crate::store::{FileStore, StoreError, create_private_dir};

/// Records kept in memory before expired ones are first looked for; after that, whenever they
/// have doubled since.
const PRUNE_ABOVE: usize = 1024;

#[derive(Clone)]
pub struct FileIdempotency {
    inner: Arc<Inner>,
}

struct Inner {
    store: FileStore,
    /// The records written in this run, by file name: the files may not hold them yet.
    records: Mutex<Records>,
}

struct Records {
    by_name: HashMap<String, Record>,
    /// How many there may be before the expired ones are dropped.
    prune_above: usize,
}

#[derive(Clone, Serialize, Deserialize)]
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
    /// Opens the records of `store`'s data folder (creating the folder, mode 0700) and removes
    /// those older than 24 h. The store has applied its journal by then.
    pub fn open(store: &FileStore) -> anyhow::Result<Self> {
        let dir = store.idempotency_dir();
        create_private_dir(dir)?;
        let now = Utc::now();
        for entry in fs::read_dir(dir)? {
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
                store: store.clone(),
                records: Mutex::new(Records {
                    by_name: HashMap::new(),
                    prune_above: PRUNE_ABOVE,
                }),
            }),
        })
    }

    /// Changes the record of `key` (`None`: there is none, or it expired) under the lock of
    /// all records, and keeps what `change` returns as the new record.
    fn update<T>(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        change: impl FnOnce(Option<Record>) -> (T, Option<Record>),
    ) -> Result<T, StoreError> {
        let name: String = Sha256::digest(format!("{tenant}\n{}", key.key()).as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let now = Utc::now();
        let mut records = self.records();
        if records.by_name.len() > records.prune_above {
            records
                .by_name
                .retain(|_, record| !expired(record.created_at, now));
            records.prune_above = PRUNE_ABOVE.max(records.by_name.len() * 2);
        }
        let current = match records.by_name.get(&name) {
            Some(record) => Some(record.clone()),
            None => self.read(&name)?,
        }
        .filter(|record| !expired(record.created_at, now));
        let (answer, new) = change(current);
        if let Some(record) = new {
            let bytes = serde_json::to_vec(&record).map_err(|e| {
                StoreError::Other(anyhow::anyhow!("cannot encode an idempotency record: {e}"))
            })?;
            self.inner.store.keep_idempotency_record(&name, bytes);
            records.by_name.insert(name, record);
        }
        Ok(answer)
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        self.inner
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A record an earlier run left (an unreadable one counts as none). Its lease ended with
    /// that run: one server uses a data folder at a time.
    fn read(&self, name: &str) -> Result<Option<Record>, StoreError> {
        let path = self
            .inner
            .store
            .idempotency_dir()
            .join(format!("{name}.json"));
        match fs::read(path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok().map(|record| Record {
                locked_until: None,
                ..record
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl IdempotencyStore for FileIdempotency {
    async fn begin(&self, tenant: &str, key: &IdempotencyKey) -> Result<Begin, StoreError> {
        let now = Utc::now();
        let lease = chrono::Duration::from_std(LEASE).unwrap_or_default();
        self.update(tenant, key, |current| match current {
            Some(record) => {
                if record.fingerprint != key.fingerprint() {
                    return (Begin::Conflict, None);
                }
                if let Some(outcome) = record.outcome {
                    return (Begin::Replay(Box::new(outcome)), None);
                }
                if record.locked_until.is_some_and(|until| until > now) {
                    return (Begin::InProgress, None);
                }
                let begin = match (&record.conversation_id, record.user_seq) {
                    (Some(conversation_id), Some(user_seq)) => Begin::Resume {
                        conversation_id: conversation_id.clone(),
                        user_seq,
                    },
                    _ => Begin::Fresh,
                };
                let record = Record {
                    locked_until: Some(now + lease),
                    ..record
                };
                (begin, Some(record))
            }
            None => (
                Begin::Fresh,
                Some(Record {
                    fingerprint: key.fingerprint().to_owned(),
                    created_at: now,
                    locked_until: Some(now + lease),
                    conversation_id: None,
                    user_seq: None,
                    outcome: None,
                }),
            ),
        })
    }

    async fn user_stored(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        conversation: &ConversationId,
        seq: i64,
    ) -> Result<(), StoreError> {
        self.update(tenant, key, |current| {
            let changed = current.map(|record| Record {
                conversation_id: Some(conversation.clone()),
                user_seq: Some(seq),
                ..record
            });
            ((), changed)
        })
    }

    async fn complete(
        &self,
        tenant: &str,
        key: &IdempotencyKey,
        outcome: &TurnOutcome,
    ) -> Result<(), StoreError> {
        self.update(tenant, key, |current| {
            let changed = current.map(|record| Record {
                outcome: Some(outcome.clone()),
                locked_until: None,
                ..record
            });
            ((), changed)
        })
    }

    async fn release(&self, tenant: &str, key: &IdempotencyKey) -> Result<(), StoreError> {
        self.update(tenant, key, |current| {
            let changed = current.map(|record| Record {
                locked_until: None,
                ..record
            });
            ((), changed)
        })
    }
}
