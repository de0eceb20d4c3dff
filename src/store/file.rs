//! Local mode's store: one append-only JSON Lines file per conversation under
//! `<data>/conversations/<conversation_id>.json`.
//!
//! The first line is the conversation's header (its owner), every further line one message.
//! An append writes one line, so its cost does not grow with the conversation, and returns once
//! the line is durable: the same bytes go to the store's journal (`<data>/journal/`), which
//! flushes the appends of all conversations together (see `journal`). After a crash, what the
//! journal holds is written into the files again before anything is served; a line that was
//! never acknowledged can only be torn at a file's end, and loading drops it. Each open
//! conversation has its own lock, so two surfaces writing at once are stored one after the other
//! with distinct seqs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::journal::{self, Entry, Journal};
use super::{ConversationStore, ConversationSummary, Owner, StoreError};
use crate::domain::{ConversationId, Message, NewMessage, UserId};

const FILE_EXTENSION: &str = "json";
/// Open conversations kept in memory (each holds a file descriptor); idle ones beyond this are
/// closed. Well under macOS's default limit of 256 descriptors for a launchd agent.
const MAX_OPEN: usize = 128;

#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Messages kept in memory per open conversation, so the history window costs no read.
    keep_recent: usize,
    open: Mutex<HashMap<ConversationId, Arc<Mutex<Option<OpenConversation>>>>>,
    journal: Journal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    conversation_id: ConversationId,
    tenant: String,
    user_id: UserId,
    created_at: DateTime<Utc>,
}

impl Header {
    fn is_owned_by(&self, owner: &Owner) -> bool {
        self.tenant == owner.tenant && self.user_id == owner.user_id
    }
}

/// One line of a conversation file.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Record {
    Conversation(Header),
    Message(Message),
}

struct OpenConversation {
    header: Header,
    file: File,
    /// Bytes of whole records; a failed write is cut back to this.
    len: u64,
    next_seq: i64,
    recent: VecDeque<Message>,
}

/// Creates `dir` (and its parents) if needed, and makes it readable by its owner only (0700).
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set permissions on {}", dir.display()))
}

impl FileStore {
    /// Opens (creating if needed, mode 0700) the conversations folder and the journal folder,
    /// and first applies what the journal kept from a run that did not stop cleanly.
    pub fn open(
        dir: impl Into<PathBuf>,
        journal_dir: &Path,
        keep_recent: usize,
    ) -> anyhow::Result<Self> {
        Self::open_with_segments(
            dir,
            journal_dir,
            keep_recent,
            journal::DEFAULT_SEGMENT_BYTES,
        )
    }

    /// `open`, with journal segments of `segment_bytes` (small ones make checkpoints frequent).
    pub fn open_with_segments(
        dir: impl Into<PathBuf>,
        journal_dir: &Path,
        keep_recent: usize,
        segment_bytes: u64,
    ) -> anyhow::Result<Self> {
        let dir = dir.into();
        create_private_dir(&dir)?;
        create_private_dir(journal_dir)?;
        // Their entries in the data folder, made durable once (they may have just been made).
        for parent in [dir.parent(), journal_dir.parent()].into_iter().flatten() {
            sync_dir(parent)?;
        }
        let recovered = journal::recover(journal_dir)
            .with_context(|| format!("cannot read the journal in {}", journal_dir.display()))?;
        apply_recovered(&dir, &recovered.entries)
            .with_context(|| format!("cannot apply the journal to {}", dir.display()))?;
        let checkpoint_dir = dir.clone();
        let journal = Journal::start(
            journal_dir,
            segment_bytes,
            &recovered,
            Arc::new(move |touched: &HashSet<String>| flush_files(&checkpoint_dir, touched)),
        )
        .with_context(|| format!("cannot start the journal in {}", journal_dir.display()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                keep_recent: keep_recent.max(1),
                open: Mutex::new(HashMap::new()),
                journal,
            }),
        })
    }

    /// A clean stop: flushes what the journal holds into the conversation files and erases it,
    /// so the next start has nothing to apply. Appends fail after it.
    pub fn close(&self) {
        self.inner.journal.close();
    }

    /// Runs blocking file work off the async executor.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| StoreError::Other(anyhow!("file store task failed: {e}")))?
    }
}

#[async_trait]
impl ConversationStore for FileStore {
    async fn append(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        message: NewMessage,
    ) -> Result<Message, StoreError> {
        let (owner, conversation) = (owner.clone(), conversation.clone());
        self.blocking(move |inner| inner.append(&owner, &conversation, message))
            .await
    }

    async fn recent(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        // Usually in memory already: served inline, as a hand-off to the blocking pool would
        // cost more than the copy (and, under load, adds to every turn's tail latency).
        if let Some(cached) = self.inner.recent_in_memory(owner, conversation, limit) {
            return cached;
        }
        let (owner, conversation) = (owner.clone(), conversation.clone());
        self.blocking(move |inner| inner.recent(&owner, &conversation, limit))
            .await
    }

    async fn messages(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let (owner, conversation) = (owner.clone(), conversation.clone());
        self.blocking(move |inner| inner.messages(&owner, &conversation, after_seq, limit))
            .await
    }

    async fn list(
        &self,
        owner: &Owner,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let owner = owner.clone();
        self.blocking(move |inner| inner.list(&owner, offset, limit))
            .await
    }

    async fn delete(&self, owner: &Owner, conversation: &ConversationId) -> Result<(), StoreError> {
        let (owner, conversation) = (owner.clone(), conversation.clone());
        self.blocking(move |inner| inner.delete(&owner, &conversation))
            .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        if let Some(failure) = self.inner.journal.failure() {
            return Err(StoreError::Unavailable(failure));
        }
        // One stat of a local folder: inline, as a hand-off to the blocking pool would cost
        // far more than the call (it was most of /health's time under load).
        let meta = fs::metadata(&self.inner.dir)?;
        if meta.is_dir() && !meta.permissions().readonly() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "{} is not a writable folder",
                self.inner.dir.display()
            )))
        }
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves no half-written record behind (writes are cut back
    // on error), so the data is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

type Slot = Arc<Mutex<Option<OpenConversation>>>;

impl Inner {
    fn path(&self, conversation: &ConversationId) -> PathBuf {
        file_path(&self.dir, conversation.as_str())
    }

    /// Appends `bytes` at `offset`, the end of the conversation's file, and makes them durable
    /// through the journal (a write too large for one journal entry goes in pieces).
    fn write_durably(
        &self,
        conversation: &ConversationId,
        file: &mut File,
        offset: u64,
        bytes: Vec<u8>,
    ) -> io::Result<()> {
        file.write_all(&bytes)?;
        let piece = self.journal.max_write(conversation.as_str());
        if bytes.len() <= piece {
            return self.journal.commit(Entry::Write {
                conversation: conversation.as_str().to_owned(),
                offset,
                bytes,
            });
        }
        let mut at = 0;
        for chunk in bytes.chunks(piece) {
            self.journal.commit(Entry::Write {
                conversation: conversation.as_str().to_owned(),
                offset: offset + at,
                bytes: chunk.to_vec(),
            })?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// The conversation's lock slot; closes idle conversations when too many are open.
    fn slot(&self, conversation: &ConversationId) -> Slot {
        let mut open = lock(&self.open);
        if let Some(slot) = open.get(conversation) {
            return Arc::clone(slot);
        }
        if open.len() >= MAX_OPEN {
            open.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        let slot = Slot::default();
        open.insert(conversation.clone(), Arc::clone(&slot));
        slot
    }

    /// Locks the conversation and loads it from disk if it is not open yet.
    fn with_conversation<T>(
        &self,
        conversation: &ConversationId,
        work: impl FnOnce(&mut Option<OpenConversation>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let slot = self.slot(conversation);
        let mut guard = lock(&slot);
        if guard.is_none() {
            *guard = load(&self.path(conversation), self.keep_recent)?;
        }
        work(&mut guard)
    }

    fn owned<'a>(
        conversation: &'a mut Option<OpenConversation>,
        owner: &Owner,
    ) -> Result<&'a mut OpenConversation, StoreError> {
        match conversation {
            Some(open) if open.header.is_owned_by(owner) => Ok(open),
            _ => Err(StoreError::NotFound),
        }
    }

    fn append(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        new: NewMessage,
    ) -> Result<Message, StoreError> {
        self.with_conversation(conversation, |slot| {
            if slot.is_none() {
                let (open, message) = self.create(owner, conversation, new)?;
                *slot = Some(open);
                return Ok(message);
            }
            let open = Self::owned(slot, owner)?;
            let message = new.into_message(open.next_seq);
            let line = encode(&Record::Message(message.clone()))?;
            let line_len = line.len() as u64;
            if let Err(e) = self.write_durably(conversation, &mut open.file, open.len, line) {
                // Cut a partial line so the next append starts clean; reload next time.
                let _ = open.file.set_len(open.len);
                *slot = None;
                return Err(e.into());
            }
            open.len += line_len;
            open.next_seq += 1;
            open.remember(message.clone(), self.keep_recent);
            Ok(message)
        })
    }

    /// Writes a new conversation's header and first message in one durable step.
    fn create(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        new: NewMessage,
    ) -> Result<(OpenConversation, Message), StoreError> {
        let header = Header {
            conversation_id: conversation.clone(),
            tenant: owner.tenant.clone(),
            user_id: owner.user_id.clone(),
            created_at: Utc::now(),
        };
        let message = new.into_message(1);
        let mut bytes = encode(&Record::Conversation(header.clone()))?;
        bytes.extend(encode(&Record::Message(message.clone()))?);

        let path = self.path(conversation);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let len = bytes.len() as u64;
        if let Err(e) = self.write_durably(conversation, &mut file, 0, bytes) {
            let _ = fs::remove_file(&path);
            return Err(e.into());
        }
        let mut open = OpenConversation {
            header,
            file,
            len,
            next_seq: 2,
            recent: VecDeque::new(),
        };
        open.remember(message.clone(), self.keep_recent);
        Ok((open, message))
    }

    /// The answer of `recent` when it needs no disk access and no waiting: the conversation is
    /// open, not locked by a write, and its cached messages cover `limit`. `None` otherwise.
    fn recent_in_memory(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        limit: usize,
    ) -> Option<Result<Vec<Message>, StoreError>> {
        let slot = lock(&self.open).get(conversation).map(Arc::clone)?;
        let guard = match slot.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let open = guard.as_ref()?;
        if !open.header.is_owned_by(owner) {
            return Some(Err(StoreError::NotFound));
        }
        open.cached_recent(limit).map(Ok)
    }

    fn recent(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let (len, last_seq, cached) = self.with_conversation(conversation, |slot| {
            let open = Self::owned(slot, owner)?;
            Ok((open.len, open.next_seq - 1, open.cached_recent(limit)))
        })?;
        match cached {
            Some(messages) => Ok(messages),
            None => {
                let after = last_seq.saturating_sub(limit as i64);
                read_messages(&self.path(conversation), len, after, limit)
            }
        }
    }

    fn messages(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        // Read outside the lock, up to the length known now: appends go on meanwhile.
        let len = self.with_conversation(conversation, |slot| Ok(Self::owned(slot, owner)?.len))?;
        read_messages(&self.path(conversation), len, after_seq, limit)
    }

    fn list(
        &self,
        owner: &Owner,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(FILE_EXTENSION) {
                continue;
            }
            let Some(header) = read_header(&path)? else {
                continue;
            };
            if !header.is_owned_by(owner) {
                continue;
            }
            let updated_at = match fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(modified) => DateTime::<Utc>::from(modified),
                // Deleted since the folder was read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            found.push(ConversationSummary {
                conversation_id: header.conversation_id,
                user_id: header.user_id,
                created_at: header.created_at,
                updated_at,
            });
        }
        found.sort_by(|a, b| {
            b.updated_at
                .cmp(&a.updated_at)
                .then_with(|| b.conversation_id.cmp(&a.conversation_id))
        });
        Ok(found.into_iter().skip(offset).take(limit).collect())
    }

    fn delete(&self, owner: &Owner, conversation: &ConversationId) -> Result<(), StoreError> {
        self.with_conversation(conversation, |slot| {
            Self::owned(slot, owner)?;
            // Journaled first: after a crash the removal is done again, and the conversation
            // never comes back from earlier entries.
            self.journal.commit(Entry::Delete {
                conversation: conversation.as_str().to_owned(),
            })?;
            fs::remove_file(self.path(conversation))?;
            // A checkpoint may have passed between the entry and the removal: then only this
            // makes the removal durable.
            sync_dir(&self.dir)?;
            *slot = None;
            Ok(())
        })?;
        let mut open = lock(&self.open);
        if open
            .get(conversation)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            open.remove(conversation);
        }
        Ok(())
    }
}

impl OpenConversation {
    /// The last `limit` messages, if the cache holds them (or the whole conversation).
    fn cached_recent(&self, limit: usize) -> Option<Vec<Message>> {
        let in_memory = self.recent.len();
        let everything_cached = self.recent.front().is_none_or(|m| m.seq == 1);
        (limit <= in_memory || everything_cached).then(|| {
            let skip = in_memory.saturating_sub(limit);
            self.recent.iter().skip(skip).cloned().collect()
        })
    }

    fn remember(&mut self, message: Message, keep: usize) {
        if self.recent.len() == keep {
            self.recent.pop_front();
        }
        self.recent.push_back(message);
    }
}

fn encode(record: &Record) -> Result<Vec<u8>, StoreError> {
    let mut line = serde_json::to_vec(record).context("cannot encode a record")?;
    line.push(b'\n');
    Ok(line)
}

fn file_path(dir: &Path, conversation: &str) -> PathBuf {
    dir.join(format!("{conversation}.{FILE_EXTENSION}"))
}

/// Makes a file's creation or removal itself durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes the named conversations' files, and the folder's entries, durable: the journal's
/// checkpoint. A file deleted since has nothing left to flush.
fn flush_files(dir: &Path, conversations: &HashSet<String>) -> io::Result<()> {
    for conversation in conversations {
        match File::open(file_path(dir, conversation)) {
            Ok(file) => file.sync_data()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    sync_dir(dir)
}

/// Applies what the journal kept from a run that did not stop cleanly, in order: each write
/// stands in its file again (the page cache may have lost it), each removal is done again.
fn apply_recovered(dir: &Path, entries: &[Entry]) -> io::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut touched = HashSet::new();
    let mut rewritten = 0;
    for entry in entries {
        let conversation = entry.conversation();
        if ConversationId::parse(conversation).is_err() {
            tracing::warn!("skipping a journal entry with an invalid conversation id");
            continue;
        }
        let path = file_path(dir, conversation);
        match entry {
            Entry::Write { offset, bytes, .. } => {
                if restore(&path, *offset, bytes)? {
                    rewritten += 1;
                }
                touched.insert(conversation.to_owned());
            }
            Entry::Delete { .. } => match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
        }
    }
    flush_files(dir, &touched)?;
    tracing::info!(
        entries = entries.len(),
        rewritten,
        "applied the store's journal left by a run that did not stop cleanly"
    );
    Ok(())
}

/// Makes `bytes` stand at `offset` in the file; whether they had to be written.
fn restore(path: &Path, offset: u64, bytes: &[u8]) -> io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(offset == 0)
        .truncate(false)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Its start was flushed long ago, and the file removed by hand since.
            tracing::warn!(file = %path.display(), "skipping a journal entry for a missing file");
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() >= offset + bytes.len() as u64 {
        let mut present = vec![0; bytes.len()];
        file.read_exact_at(&mut present, offset)?;
        if present == bytes {
            return Ok(false);
        }
    }
    file.write_all_at(bytes, offset)?;
    Ok(true)
}

/// Reads one line; `None` at the end of the data. A line without its newline is torn.
fn next_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Option<bool>> {
    line.clear();
    if reader.read_until(b'\n', line)? == 0 {
        return Ok(None);
    }
    let complete = line.last() == Some(&b'\n');
    Ok(Some(complete))
}

/// Opens a conversation file: checks every record, drops a torn tail left by a crash.
/// `None` when there is no such conversation.
fn load(path: &Path, keep_recent: usize) -> Result<Option<OpenConversation>, StoreError> {
    let file = match OpenOptions::new().read(true).append(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut reader = BufReader::new(&file);
    let mut line = Vec::new();
    let mut header = None;
    let mut len = 0u64;
    let mut last_seq = 0;
    let mut recent = VecDeque::with_capacity(keep_recent);
    while let Some(complete) = next_line(&mut reader, &mut line)? {
        if !complete {
            break; // torn tail: never acknowledged
        }
        let record_len = line.len() as u64;
        match (serde_json::from_slice::<Record>(&line), &header) {
            (Ok(Record::Conversation(h)), None) => header = Some(h),
            (Ok(Record::Message(m)), Some(_)) => {
                last_seq = last_seq.max(m.seq);
                if recent.len() == keep_recent {
                    recent.pop_front();
                }
                recent.push_back(m);
            }
            (Ok(_), _) => {
                return Err(anyhow!("{}: records out of order", path.display()).into());
            }
            (Err(e), _) => {
                // A damaged line inside the file: skip it rather than lose what follows.
                tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable record");
            }
        }
        len += record_len;
    }
    drop(reader);

    let Some(header) = header else {
        // A crash while creating it: its first message was never acknowledged.
        tracing::warn!(file = %path.display(), "removing a conversation file torn at creation");
        fs::remove_file(path)?;
        return Ok(None);
    };
    if file.metadata()?.len() > len {
        tracing::warn!(file = %path.display(), "dropping a torn last record");
        file.set_len(len)?;
        file.sync_all()?;
    }
    Ok(Some(OpenConversation {
        header,
        file,
        len,
        next_seq: last_seq + 1,
        recent,
    }))
}

fn read_header(path: &Path) -> Result<Option<Header>, StoreError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut line = Vec::new();
    match next_line(&mut BufReader::new(file), &mut line)? {
        Some(true) => match serde_json::from_slice(&line) {
            Ok(Record::Conversation(header)) => Ok(Some(header)),
            _ => Ok(None),
        },
        _ => Ok(None),
    }
}

/// Messages after `after_seq` among the first `len` bytes of a conversation file.
fn read_messages(
    path: &Path,
    len: u64,
    after_seq: i64,
    limit: usize,
) -> Result<Vec<Message>, StoreError> {
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound,
        _ => e.into(),
    })?;
    let mut reader = BufReader::new(file.take(len));
    let mut line = Vec::new();
    let mut messages = Vec::new();
    while messages.len() < limit {
        match next_line(&mut reader, &mut line)? {
            Some(true) => {
                if let Ok(Record::Message(m)) = serde_json::from_slice(&line)
                    && m.seq > after_seq
                {
                    messages.push(m);
                }
            }
            _ => break,
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Role, SurfaceId};

    fn owner() -> Owner {
        Owner {
            tenant: "local".into(),
            user_id: UserId::parse("ana").unwrap(),
        }
    }

    fn id(conversation: &str) -> ConversationId {
        ConversationId::parse(conversation).unwrap()
    }

    fn say(text: &str) -> NewMessage {
        NewMessage {
            role: Role::User,
            surface_id: SurfaceId::parse("cli").unwrap(),
            content: text.to_owned(),
            model: None,
            usage: None,
            api_key_id: None,
        }
    }

    /// A temporary data folder (removed when dropped) and its store's two folders.
    fn folders() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let data = tempfile::tempdir().unwrap();
        let (conversations, journal) = (
            data.path().join("conversations"),
            data.path().join("journal"),
        );
        (data, conversations, journal)
    }

    async fn contents(store: &FileStore, conversation: &str) -> Vec<(i64, String)> {
        match store.messages(&owner(), &id(conversation), 0, 1000).await {
            Ok(messages) => messages.into_iter().map(|m| (m.seq, m.content)).collect(),
            Err(StoreError::NotFound) => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn after_a_crash_the_journal_restores_writes_the_files_lost_and_redoes_removals() {
        let (_data, conversations, journal) = folders();
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        let ana = owner();
        store.append(&ana, &id("conv_a"), say("a1")).await.unwrap();
        store.append(&ana, &id("conv_b"), say("b1")).await.unwrap();
        store.append(&ana, &id("conv_a"), say("a2")).await.unwrap();
        store.delete(&ana, &id("conv_b")).await.unwrap();
        store
            .append(&ana, &id("conv_b"), say("b again"))
            .await
            .unwrap();
        store.append(&ana, &id("conv_c"), say("c1")).await.unwrap();
        store.delete(&ana, &id("conv_c")).await.unwrap();
        store.inner.journal.abandon();
        drop(store);

        // What a power cut can do to writes never flushed: a file gone, a tail cut off, and a
        // removal undone.
        fs::remove_file(conversations.join("conv_a.json")).unwrap();
        let b = conversations.join("conv_b.json");
        let b_len = fs::metadata(&b).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&b)
            .unwrap()
            .set_len(b_len / 2)
            .unwrap();
        fs::write(conversations.join("conv_c.json"), b"stale").unwrap();

        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        assert_eq!(
            contents(&store, "conv_a").await,
            [(1, "a1".to_owned()), (2, "a2".to_owned())]
        );
        assert_eq!(
            contents(&store, "conv_b").await,
            [(1, "b again".to_owned())]
        );
        assert!(!conversations.join("conv_c.json").exists());
        let next = store.append(&ana, &id("conv_a"), say("a3")).await.unwrap();
        assert_eq!(next.seq, 3);
    }

    #[tokio::test]
    async fn appends_go_on_across_many_checkpoints() {
        let (_data, conversations, journal) = folders();
        // Segments of 8 KiB: a checkpoint every dozen appends or so.
        let store = FileStore::open_with_segments(&conversations, &journal, 20, 8192).unwrap();
        let store = Arc::new(store);
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for i in 0..100 {
                        let conversation = id(&format!("conv_{}", (w + i) % 6));
                        store
                            .append(
                                &owner(),
                                &conversation,
                                say(&format!("w{w} m{i} {}", "x".repeat(200))),
                            )
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        drop(Arc::into_inner(store).unwrap());

        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        let mut total = 0;
        for c in 0..6 {
            let messages = contents(&store, &format!("conv_{c}")).await;
            let seqs: Vec<i64> = messages.iter().map(|(seq, _)| *seq).collect();
            assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
            total += messages.len();
        }
        assert_eq!(total, 400);
    }

    #[tokio::test]
    async fn a_message_larger_than_a_journal_segment_is_journaled_in_pieces() {
        let (_data, conversations, journal) = folders();
        let store = FileStore::open_with_segments(&conversations, &journal, 20, 8192).unwrap();
        let ana = owner();
        // Journaled, then removed: applying the journal again must not mix the two.
        store
            .append(&ana, &id("conv_big"), say("old"))
            .await
            .unwrap();
        store.delete(&ana, &id("conv_big")).await.unwrap();
        let large = "y".repeat(20_000);
        store
            .append(&ana, &id("conv_big"), say(&large))
            .await
            .unwrap();
        store
            .append(&ana, &id("conv_big"), say("small"))
            .await
            .unwrap();
        store.inner.journal.abandon();
        drop(store);

        // What the journal still holds is applied again over the files as they are.
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        assert_eq!(
            contents(&store, "conv_big").await,
            [(1, large), (2, "small".to_owned())]
        );
    }
}
