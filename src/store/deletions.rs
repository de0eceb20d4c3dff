//! Local mode's record of deleted conversations: which conversation, whose, and when (never
//! what it held), one JSON line each in `<conversations>/deleted.jsonl`.
//!
//! A deletion is remembered for good (a line is tiny): a copy of the conversation that sync
//! brings later from a server that had not heard of the deletion yet must not bring it back,
//! and sync tells the cloud about the deletions made here. A line is durable before the
//! conversation's file is removed, so a crash in between leaves the deletion to be redone.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{ConversationId, UserId};

pub const FILE_NAME: &str = "deleted.jsonl";

/// One deleted conversation. Its messages stamped before `deleted_at` are gone; a message
/// stamped after it (written later under the same id) starts the conversation anew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub deleted_at: DateTime<Utc>,
    /// Where it was deleted, when it came here through sync (`None`: deleted here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

pub struct Deletions {
    path: PathBuf,
    /// Opened at the first deletion (a folder that never had one has no such file).
    file: Mutex<Option<File>>,
    /// The latest deletion of each conversation id.
    latest: Mutex<HashMap<ConversationId, Deletion>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Deletions {
    /// Reads the record in `dir`, if there is one; a line torn by a crash is dropped (its
    /// deletion was never acknowledged).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(FILE_NAME);
        let mut latest = HashMap::new();
        let file = match OpenOptions::new().read(true).append(true).open(&path) {
            Ok(file) => {
                let (deletions, whole) = read_from(&file, 0)?;
                for deletion in deletions {
                    remember(&mut latest, deletion);
                }
                if file.metadata()?.len() > whole {
                    file.set_len(whole)?;
                    file.sync_all()?;
                }
                Some(file)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            file: Mutex::new(file),
            latest: Mutex::new(latest),
        })
    }

    /// Records a deletion durably.
    pub fn record(&self, deletion: Deletion) -> io::Result<()> {
        let mut line = serde_json::to_vec(&deletion).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut guard = lock(&self.file);
        let file = match guard.as_mut() {
            Some(file) => file,
            None => {
                let file = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(&self.path)?;
                // Its name must survive a crash too.
                if let Some(dir) = self.path.parent() {
                    File::open(dir)?.sync_all()?;
                }
                guard.insert(file)
            }
        };
        let before = file.metadata()?.len();
        if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
            let _ = file.set_len(before);
            return Err(e);
        }
        drop(guard);
        remember(&mut lock(&self.latest), deletion);
        Ok(())
    }

    /// When the conversation was last deleted, if it was.
    pub fn latest(&self, conversation: &ConversationId) -> Option<Deletion> {
        lock(&self.latest).get(conversation).cloned()
    }

    /// Every deletion, the latest of each conversation.
    pub fn all(&self) -> Vec<Deletion> {
        lock(&self.latest).values().cloned().collect()
    }

    /// The deletions recorded from byte `offset` on, and the offset after them.
    pub fn since(&self, offset: u64) -> io::Result<(Vec<Deletion>, u64)> {
        match File::open(&self.path) {
            Ok(file) => read_from(&file, offset),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Vec::new(), 0)),
            Err(e) => Err(e),
        }
    }
}

fn remember(latest: &mut HashMap<ConversationId, Deletion>, deletion: Deletion) {
    match latest.get(&deletion.conversation_id) {
        Some(known) if known.deleted_at >= deletion.deleted_at => {}
        _ => {
            latest.insert(deletion.conversation_id.clone(), deletion);
        }
    }
}

/// The whole lines from `offset` on (an unreadable one is skipped), and where they end.
fn read_from(file: &File, offset: u64) -> io::Result<(Vec<Deletion>, u64)> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(offset))?;
    let mut deletions = Vec::new();
    let mut end = offset;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        end += n as u64;
        match serde_json::from_slice(&line) {
            Ok(deletion) => deletions.push(deletion),
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable deletion record"),
        }
    }
    Ok((deletions, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deletion(conversation: &str, at: DateTime<Utc>) -> Deletion {
        Deletion {
            conversation_id: ConversationId::parse(conversation).unwrap(),
            user_id: UserId::parse("ana").unwrap(),
            deleted_at: at,
            origin: None,
        }
    }

    #[test]
    fn deletions_survive_a_restart_and_the_latest_of_each_conversation_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (early, late) = (Utc::now(), Utc::now() + chrono::Duration::seconds(5));
        let deletions = Deletions::open(dir.path()).unwrap();
        deletions.record(deletion("conv_a", late)).unwrap();
        deletions.record(deletion("conv_a", early)).unwrap();
        deletions.record(deletion("conv_b", early)).unwrap();
        drop(deletions);

        // A crash tore the last line.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        file.write_all(b"{\"conversation_id\":\"conv_c\"").unwrap();

        let deletions = Deletions::open(dir.path()).unwrap();
        let a = ConversationId::parse("conv_a").unwrap();
        assert_eq!(deletions.latest(&a).unwrap().deleted_at, late);
        assert!(
            deletions
                .latest(&ConversationId::parse("conv_c").unwrap())
                .is_none()
        );
        let (all, end) = deletions.since(0).unwrap();
        assert_eq!(all.len(), 3);
        deletions.record(deletion("conv_d", late)).unwrap();
        let (more, _) = deletions.since(end).unwrap();
        assert_eq!(more, [deletion("conv_d", late)]);
    }
}
