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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::deletions::{Deletion, Deletions};
use super::id_index::IdIndex;
use super::journal::{self, Entry, Files, Journal};
use super::{Appended, ConversationStore, ConversationSummary, Owner, Priced, StoreError};
use crate::domain::{ConversationId, Message, NewMessage, UserId, next_created_at};
use crate::usage_log::{self, LEDGER_FILE, UsageRecord};

const FILE_EXTENSION: &str = "json";
/// Conversations kept in memory (their recent messages and ids; no file descriptor, so
/// macOS's limit of 256 descriptors for a launchd agent does not bound them); idle ones beyond
/// this are dropped, to be read again when next used. Sized for a thousand conversations
/// being answered at once (fewer made every turn read and parse its whole file again, twice)
/// while memory stays flat in the number of conversations (`bench/growth.sh`: about 4 KB each).
const MAX_OPEN: usize = 1024;
/// While the disk is known to be full, `check` writes (then removes) a file this large to see
/// whether there is room again: about a message of the largest size, however escaped.
const PROBE_BYTES: usize = 256 << 10;
const PROBE_FILE: &str = ".space-probe";
/// The journal's names for files that are not conversations: no conversation id has a `~`.
const LEDGER: &str = "~ledger";
const IDEMPOTENCY: &str = "~idempotency/";

#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Messages kept in memory per open conversation, so the history window costs no read.
    keep_recent: usize,
    open: Mutex<HashMap<ConversationId, Slot>>,
    journal: Journal,
    files: Arc<StoreFiles>,
    deletions: Deletions,
    /// Woken by every message written and every conversation deleted here.
    change: tokio::sync::Notify,
    /// Set when a write found the disk full, cleared by the next write that succeeds (or a
    /// health check that finds room again). Writes are never held back by it.
    full: AtomicBool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    conversation_id: ConversationId,
    tenant: String,
    user_id: UserId,
    created_at: DateTime<Utc>,
    /// New each time the file is written from scratch (created, or rewritten by a deletion
    /// that keeps later messages): a position in the file is only good for the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incarnation: Option<String>,
}

/// How far sync has read a conversation's file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCursor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    pub bytes: u64,
}

/// What became of messages sync brought from elsewhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Stored as new messages.
    pub added: usize,
    /// Already here, the same.
    pub duplicates: usize,
    /// Already here under the same id but different: the copy brought wins.
    pub replaced: usize,
    /// Of a conversation deleted after they were written: not stored.
    pub dropped: usize,
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

/// A conversation read into memory. Its file is opened only to write (see `append_lines`).
struct OpenConversation {
    header: Header,
    /// Bytes of whole records; a failed write is cut back to this.
    len: u64,
    next_seq: i64,
    /// Where each message id is: a message stored again is found instead of stored twice.
    ids: IdIndex,
    /// The newest message's time: the conversation's clock (see `next_created_at`).
    last_created_at: Option<DateTime<Utc>>,
    /// The newest messages in seq order (at most `keep_recent`).
    recent: VecDeque<Message>,
    /// Whether older messages than `recent` holds are in the file.
    evicted: bool,
    /// Whether a later line replaces an earlier message (sync's): reading must then go on to
    /// the end of the file.
    replaced: bool,
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
        let files = Arc::new(StoreFiles::new(&dir)?);
        // Their entries in the data folder, made durable once (they may have just been made).
        for parent in [dir.parent(), journal_dir.parent()].into_iter().flatten() {
            sync_dir(parent)?;
        }
        let recovered = journal::recover(journal_dir)
            .with_context(|| format!("cannot read the journal in {}", journal_dir.display()))?;
        files
            .apply_recovered(&recovered.entries)
            .with_context(|| format!("cannot apply the journal to {}", dir.display()))?;
        let journal = Journal::start(
            journal_dir,
            segment_bytes,
            &recovered,
            Arc::clone(&files) as Arc<dyn Files>,
        )
        .with_context(|| format!("cannot start the journal in {}", journal_dir.display()))?;
        let deletions = Deletions::open(&dir)
            .with_context(|| format!("cannot read the deletions in {}", dir.display()))?;
        let store = Self {
            inner: Arc::new(Inner {
                dir,
                keep_recent: keep_recent.max(1),
                open: Mutex::new(HashMap::new()),
                journal,
                files,
                deletions,
                change: tokio::sync::Notify::new(),
                full: AtomicBool::new(false),
            }),
        };
        // A crash between recording a deletion and carrying it out leaves it to redo.
        for deletion in store.inner.deletions.all() {
            store
                .inner
                .erase_until(&deletion)
                .with_context(|| format!("cannot delete {}", deletion.conversation_id))?;
        }
        Ok(store)
    }

    /// A clean stop: flushes what the journal holds into the conversation files and erases it,
    /// so the next start has nothing to apply. Appends fail after it.
    pub fn close(&self) {
        self.inner.journal.close();
    }

    /// Where the idempotency records are (`FileIdempotency`).
    pub fn idempotency_dir(&self) -> &Path {
        &self.inner.files.idempotency
    }

    /// Keeps an idempotency record (file `name`.json in `idempotency_dir`), whole, without a
    /// flush of its own: it rides with the next journal write, or the clean stop.
    pub fn keep_idempotency_record(&self, name: &str, bytes: Vec<u8>) {
        self.inner.journal.ride(Entry::Replace {
            file: format!("{IDEMPOTENCY}{name}"),
            bytes,
        });
    }

    /// Sync's side of the store: wakes once something is written or deleted here.
    pub async fn changed(&self) {
        self.inner.change.notified().await;
    }

    /// Every conversation file and its length now.
    pub fn conversation_files(&self) -> Result<Vec<(ConversationId, u64)>, StoreError> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.inner.dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(FILE_EXTENSION) {
                continue;
            }
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| ConversationId::parse(s).ok())
            else {
                continue;
            };
            match entry.metadata() {
                Ok(meta) => files.push((id, meta.len())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(files)
    }

    /// The owners of the conversations here.
    pub fn owners(&self) -> Result<BTreeSet<UserId>, StoreError> {
        let mut owners = BTreeSet::new();
        for (id, _) in self.conversation_files()? {
            if let Some(header) = read_header(&self.inner.path(&id))? {
                owners.insert(header.user_id);
            }
        }
        Ok(owners)
    }

    /// The messages written here (not brought by sync) in the conversation's file after
    /// `from`, its owner, and where reading stopped. A cursor into another incarnation of the
    /// file counts as the start. `None`: no such conversation.
    pub fn written_here(
        &self,
        conversation: &ConversationId,
        from: &FileCursor,
    ) -> Result<Option<(UserId, Vec<Message>, FileCursor)>, StoreError> {
        let inner = &self.inner;
        let Some((header, len)) = inner.with_conversation(conversation, |slot| {
            Ok(slot.as_ref().map(|open| (open.header.clone(), open.len)))
        })?
        else {
            return Ok(None);
        };
        let start = if from.incarnation == header.incarnation && from.bytes <= len {
            from.bytes
        } else {
            0
        };
        let mut messages = Vec::new();
        let end = read_lines(&inner.path(conversation), start, len, |record| {
            if let Record::Message(m) = record
                && m.origin.is_none()
            {
                messages.push(m);
            }
            true
        })?;
        let cursor = FileCursor {
            incarnation: header.incarnation.clone(),
            bytes: end,
        };
        Ok(Some((header.user_id, messages, cursor)))
    }

    pub fn deletions(&self) -> &Deletions {
        &self.inner.deletions
    }

    /// Adds messages written elsewhere (each with its id, time and origin) to the owner's
    /// conversation, creating it if needed; see [`Applied`] for what happens to each.
    pub async fn apply_remote(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        messages: Vec<Message>,
    ) -> Result<Applied, StoreError> {
        let (owner, conversation) = (owner.clone(), conversation.clone());
        let applied = self
            .blocking(move |inner| inner.apply_remote(&owner, &conversation, messages))
            .await;
        self.noted(applied)
    }

    /// A deletion made elsewhere: recorded, then carried out here.
    pub async fn apply_remote_deletion(&self, deletion: Deletion) -> Result<(), StoreError> {
        let done = self
            .blocking(move |inner| {
                if inner
                    .deletions
                    .latest(&deletion.conversation_id)
                    .is_some_and(|known| known.deleted_at >= deletion.deleted_at)
                {
                    return Ok(());
                }
                inner.deletions.record(deletion.clone())?;
                inner.erase_until(&deletion)
            })
            .await;
        self.noted(done)
    }

    /// A write's result, noting whether the disk is full (for `check`).
    fn noted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) => {
                if self.inner.full.load(Ordering::Relaxed) {
                    self.inner.full.store(false, Ordering::Relaxed);
                    tracing::info!("the disk has room again: appends are stored");
                }
            }
            Err(StoreError::Full(_)) => self.inner.full.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
        result
    }

    /// An append, with the reply's ledger line when it is `priced`.
    async fn append_priced(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        message: NewMessage,
        priced: Option<Priced>,
    ) -> Result<Appended, StoreError> {
        let (inner, owner, conversation) =
            (Arc::clone(&self.inner), owner.clone(), conversation.clone());
        // A task of its own: once its line is handed to the journal, the append must see it
        // through (the conversation's length and seq follow it), whether or not the caller
        // still waits.
        let appended = tokio::spawn(async move {
            inner
                .append_awaiting(&owner, &conversation, message, priced)
                .await
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Other(anyhow!("file store task failed: {e}"))));
        let appended = self.noted(appended)?;
        if !appended.existed {
            self.inner.change.notify_one();
        }
        Ok(appended)
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
    async fn append_once(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        message: NewMessage,
    ) -> Result<Appended, StoreError> {
        self.append_priced(owner, conversation, message, None).await
    }

    async fn append_reply(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        reply: NewMessage,
        priced: Priced,
    ) -> Result<Appended, StoreError> {
        self.append_priced(owner, conversation, reply, Some(priced))
            .await
    }

    async fn record_cost(&self, record: &UsageRecord<'_>) -> Result<(), StoreError> {
        let line = ledger_entry(record)?;
        let result = self.inner.journal.commit_async(line).await;
        self.noted(result.map_err(StoreError::from))
    }

    async fn find(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        id: &str,
    ) -> Result<Option<Message>, StoreError> {
        let (owner, conversation, id) = (owner.clone(), conversation.clone(), id.to_owned());
        self.blocking(move |inner| inner.find(&owner, &conversation, &id))
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
        let deleted = self
            .blocking(move |inner| inner.delete(&owner, &conversation))
            .await;
        self.noted(deleted)?;
        self.inner.change.notify_one();
        Ok(())
    }

    async fn check(&self) -> Result<(), StoreError> {
        if let Some(failure) = self.inner.journal.failure() {
            return Err(StoreError::Unavailable(failure));
        }
        if self.inner.full.load(Ordering::Relaxed) {
            // Still full? (Rare, and only until there is room: off the async threads.)
            let probed = self.blocking(|inner| Ok(inner.probe_space())).await?;
            self.noted(probed)?;
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
        if journal::is_storage_full(&e) {
            StoreError::Full(e.to_string())
        } else {
            StoreError::Unavailable(e.to_string())
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves no half-written record behind (writes are cut back
    // on error), so the data is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What `Inner::prepare_append` leaves to do.
enum Prepared {
    /// Handed to the journal next (`Inner::finish_append`).
    Line(PendingLine),
    /// Nothing: this is the append's result.
    Done(Result<Appended, StoreError>),
    /// On the blocking pool.
    Elsewhere(Elsewhere),
}

/// Appends that block: `Inner::append_awaiting` hands them to the blocking pool.
enum Elsewhere {
    /// The file is to be read or created, or the message may be there already.
    Message(NewMessage),
    /// A line longer than one journal entry, written in pieces.
    Long {
        message: Message,
        line: Vec<u8>,
        with: Vec<Entry>,
    },
}

/// What the blocking pool left an async append to do.
enum Blocked {
    /// Nothing: the message is stored.
    Appended(Appended),
    /// Wait for a new conversation's first bytes (`Inner::finish_create`).
    Creating(PendingCreate),
}

/// A new conversation's file, created empty (see `Inner::create`).
struct NewFile {
    header: Header,
    /// Its header and first messages.
    bytes: Vec<u8>,
    path: PathBuf,
    file: File,
}

/// A new conversation whose first bytes are handed to the journal next.
struct PendingCreate {
    header: Header,
    len: u64,
    path: PathBuf,
    entry: Entry,
    message: Message,
}

/// A message's line ready for the journal: room made for it at the end of `file`.
struct PendingLine {
    message: Message,
    file: File,
    entry: Entry,
    added: u64,
}

/// A conversation's lock: held by an append until its line is durable, which an async append
/// awaits (so it is tokio's; blocking-pool code takes it with `blocking_lock`).
type Slot = Arc<tokio::sync::Mutex<Option<OpenConversation>>>;

impl Inner {
    fn path(&self, conversation: &ConversationId) -> PathBuf {
        file_path(&self.dir, conversation.as_str())
    }

    /// Whether `PROBE_BYTES` can be written in the conversations folder now.
    fn probe_space(&self) -> Result<(), StoreError> {
        let path = self.dir.join(PROBE_FILE);
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(&vec![0; PROBE_BYTES]));
        let _ = fs::remove_file(&path);
        Ok(written?)
    }

    /// Appends `bytes` at `offset`, the end of the conversation's file, durably: room is made
    /// in the file first (a full disk refuses it here, before anything is journaled), then the
    /// journal takes the write and carries it out once it is durable. A write too large for
    /// one journal entry goes in pieces; `with` (a reply's ledger line) goes in one record with
    /// the last, so that it is durable exactly when the whole write is.
    fn write_durably(
        &self,
        conversation: &ConversationId,
        file: &File,
        offset: u64,
        bytes: Vec<u8>,
        with: Vec<Entry>,
    ) -> io::Result<()> {
        reserve(file, offset, bytes.len() as u64)?;
        let piece = self.room_for_one_entry(conversation, &with);
        let pieces = bytes.len().div_ceil(piece);
        let mut with = Some(with);
        for (i, chunk) in bytes.chunks(piece).enumerate() {
            let last = i + 1 == pieces;
            self.journal.commit(journal_write(
                conversation,
                offset + (i * piece) as u64,
                chunk.to_vec(),
                with.take_if(|_| last).unwrap_or_default(),
            ))?;
        }
        Ok(())
    }

    /// The conversation's lock slot; drops idle conversations when too many are in memory.
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
        // Uncontended — always so while the store opens, which async code does — it takes
        // the lock without blocking (`blocking_lock` refuses to run on an async thread).
        let mut guard = match slot.try_lock() {
            Ok(guard) => guard,
            Err(_) => slot.blocking_lock(),
        };
        self.load_into(conversation, &mut guard)?;
        work(&mut guard)
    }

    /// Reads the conversation from disk if it is not open yet.
    fn load_into(
        &self,
        conversation: &ConversationId,
        slot: &mut Option<OpenConversation>,
    ) -> Result<(), StoreError> {
        if slot.is_none() {
            *slot = load(&self.path(conversation), self.keep_recent)?;
        }
        Ok(())
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

    /// `append_once` for async callers. The usual append (the conversation open in memory, a
    /// new message whose line is one journal entry) is prepared on the caller's thread, as an
    /// open and an `fallocate` cost less than a hand-off to the blocking pool, and waits for
    /// the journal's flush without holding a thread: thousands of turns in flight would
    /// otherwise each park a thread of the pool. Anything else goes to the pool as before.
    async fn append_awaiting(
        self: Arc<Self>,
        owner: &Owner,
        conversation: &ConversationId,
        new: NewMessage,
        priced: Option<Priced>,
    ) -> Result<Appended, StoreError> {
        let mut slot = self.slot(conversation).lock_owned().await;
        let prepared = self.prepare_append(&mut slot, owner, conversation, new, priced.as_ref());
        let elsewhere = match prepared {
            Prepared::Line(line) => return self.finish_append(&mut slot, line).await,
            Prepared::Done(result) => return result,
            Prepared::Elsewhere(elsewhere) => elsewhere,
        };
        let (inner, owner, conversation) = (Arc::clone(&self), owner.clone(), conversation.clone());
        let (mut slot, blocked) = tokio::task::spawn_blocking(move || {
            let blocked = match elsewhere {
                Elsewhere::Message(new) => {
                    inner
                        .load_into(&conversation, &mut slot)
                        .and_then(|()| match slot.as_ref() {
                            None => inner.prepare_create(
                                &mut slot,
                                &owner,
                                &conversation,
                                new,
                                priced.as_ref(),
                            ),
                            Some(_) => inner
                                .append_to(&mut slot, &owner, &conversation, new, priced.as_ref())
                                .map(Blocked::Appended),
                        })
                }
                Elsewhere::Long {
                    message,
                    line,
                    with,
                } => inner
                    .append_lines(&conversation, &mut slot, line, with)
                    .map(|()| Blocked::Appended(inner.remembered(&mut slot, message))),
            };
            (slot, blocked)
        })
        .await
        .map_err(|e| StoreError::Other(anyhow!("file store task failed: {e}")))?;
        match blocked? {
            Blocked::Appended(appended) => Ok(appended),
            Blocked::Creating(created) => self.finish_create(&mut slot, created).await,
        }
    }

    /// A new conversation's first message, up to handing its file's first bytes to the
    /// journal (`finish_create` waits for them); one too long for a journal entry is written
    /// here, as `create` does.
    fn prepare_create(
        &self,
        slot: &mut Option<OpenConversation>,
        owner: &Owner,
        conversation: &ConversationId,
        new: NewMessage,
        priced: Option<&Priced>,
    ) -> Result<Blocked, StoreError> {
        let created_at = next_created_at(
            self.deletions
                .latest(conversation)
                .map(|deletion| deletion.deleted_at),
        );
        let message = new.into_message(1, created_at);
        let with = ledger_lines(conversation, &message, priced)?;
        let file = self.new_file(owner, conversation, std::slice::from_ref(&message))?;
        if file.bytes.len() > self.room_for_one_entry(conversation, &with) {
            *slot = Some(self.fill(conversation, file, Vec::new(), with)?);
            return Ok(Blocked::Appended(self.remembered(slot, message)));
        }
        let len = file.bytes.len() as u64;
        if let Err(e) = reserve(&file.file, 0, len) {
            let _ = fs::remove_file(&file.path);
            return Err(e.into());
        }
        Ok(Blocked::Creating(PendingCreate {
            header: file.header,
            len,
            path: file.path,
            entry: journal_write(conversation, 0, file.bytes, with),
            message,
        }))
    }

    /// Waits for a new conversation's first bytes to be durable, then opens it; on failure
    /// removes its file, as `create` does.
    async fn finish_create(
        &self,
        slot: &mut Option<OpenConversation>,
        created: PendingCreate,
    ) -> Result<Appended, StoreError> {
        if let Err(e) = self.journal.commit_async(created.entry).await {
            let _ = fs::remove_file(&created.path);
            return Err(e.into());
        }
        *slot = Some(self.opened(created.header, created.len, Vec::new()));
        Ok(self.remembered(slot, created.message))
    }

    /// See `append_awaiting`: the usual append, up to handing its line to the journal.
    fn prepare_append(
        &self,
        slot: &mut Option<OpenConversation>,
        owner: &Owner,
        conversation: &ConversationId,
        new: NewMessage,
        priced: Option<&Priced>,
    ) -> Prepared {
        let Some(open) = slot.as_mut() else {
            return Prepared::Elsewhere(Elsewhere::Message(new));
        };
        if !open.header.is_owned_by(owner) {
            return Prepared::Done(Err(StoreError::NotFound));
        }
        if new
            .id
            .as_ref()
            .is_some_and(|id| open.ids.candidates(id).next().is_some())
        {
            return Prepared::Elsewhere(Elsewhere::Message(new));
        }
        let message = new.into_message(open.next_seq, next_created_at(open.last_created_at));
        let encoded = encode(&Record::Message(message.clone()))
            .and_then(|line| Ok((line, ledger_lines(conversation, &message, priced)?)));
        let (line, with) = match encoded {
            Ok(encoded) => encoded,
            Err(e) => return Prepared::Done(Err(e)),
        };
        if line.len() > self.room_for_one_entry(conversation, &with) {
            return Prepared::Elsewhere(Elsewhere::Long {
                message,
                line,
                with,
            });
        }
        let offset = open.len;
        let file = OpenOptions::new()
            .write(true)
            .open(self.path(conversation))
            .and_then(|file| {
                if let Err(e) = reserve(&file, offset, line.len() as u64) {
                    let _ = file.set_len(offset);
                    return Err(e);
                }
                Ok(file)
            });
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                *slot = None;
                return Prepared::Done(Err(e.into()));
            }
        };
        let added = line.len() as u64;
        Prepared::Line(PendingLine {
            message,
            file,
            entry: journal_write(conversation, offset, line, with),
            added,
        })
    }

    /// Waits for the prepared line to be durable, then counts it in the open conversation; on
    /// failure cuts the file back, as `append_lines` does.
    async fn finish_append(
        &self,
        slot: &mut Option<OpenConversation>,
        line: PendingLine,
    ) -> Result<Appended, StoreError> {
        if let Err(e) = self.journal.commit_async(line.entry).await {
            if let Some(open) = slot.as_ref() {
                let _ = line.file.set_len(open.len);
            }
            *slot = None;
            return Err(e.into());
        }
        if let Some(open) = slot.as_mut() {
            open.len += line.added;
        }
        Ok(self.remembered(slot, line.message))
    }

    /// A message just appended, kept in the open conversation's memory.
    fn remembered(&self, slot: &mut Option<OpenConversation>, message: Message) -> Appended {
        if let Some(open) = slot.as_mut() {
            open.remember(message.clone(), self.keep_recent);
        }
        Appended {
            message,
            existed: false,
        }
    }

    /// The longest line `write_durably` writes as one journal entry, with `with`.
    fn room_for_one_entry(&self, conversation: &ConversationId, with: &[Entry]) -> usize {
        let overhead = if with.is_empty() {
            0
        } else {
            Journal::group_overhead(with)
        };
        self.journal
            .max_write(conversation.as_str())
            .saturating_sub(overhead)
            .max(1)
    }

    /// An append on the conversation's locked slot, loaded (see `append_awaiting`).
    fn append_to(
        &self,
        slot: &mut Option<OpenConversation>,
        owner: &Owner,
        conversation: &ConversationId,
        new: NewMessage,
        priced: Option<&Priced>,
    ) -> Result<Appended, StoreError> {
        let Some(open) = slot.as_mut() else {
            let created_at = next_created_at(
                self.deletions
                    .latest(conversation)
                    .map(|deletion| deletion.deleted_at),
            );
            let message = new.into_message(1, created_at);
            let with = ledger_lines(conversation, &message, priced)?;
            *slot = Some(self.create(owner, conversation, vec![message.clone()], with)?);
            return Ok(Appended {
                message,
                existed: false,
            });
        };
        if !open.header.is_owned_by(owner) {
            return Err(StoreError::NotFound);
        }
        if let Some(id) = &new.id
            && let Some(found) = self.stored(conversation, open, id)?
        {
            return Ok(Appended {
                message: found,
                existed: true,
            });
        }
        let message = new.into_message(open.next_seq, next_created_at(open.last_created_at));
        let line = encode(&Record::Message(message.clone()))?;
        let with = ledger_lines(conversation, &message, priced)?;
        self.append_lines(conversation, slot, line, with)?;
        Ok(self.remembered(slot, message))
    }

    /// Appends whole lines at the end of the open conversation's file, durably, with `with`
    /// (see `write_durably`). On failure anything written is cut off and the conversation is
    /// read again from disk next time.
    fn append_lines(
        &self,
        conversation: &ConversationId,
        slot: &mut Option<OpenConversation>,
        lines: Vec<u8>,
        with: Vec<Entry>,
    ) -> Result<(), StoreError> {
        let Some(open) = slot.as_mut() else {
            return Err(StoreError::NotFound);
        };
        let added = lines.len() as u64;
        let written = OpenOptions::new()
            .write(true)
            .open(self.path(conversation))
            .and_then(|file| {
                let written = self.write_durably(conversation, &file, open.len, lines, with);
                if written.is_err() {
                    let _ = file.set_len(open.len);
                }
                written
            });
        if let Err(e) = written {
            *slot = None;
            return Err(e.into());
        }
        open.len += added;
        Ok(())
    }

    /// Writes a new conversation's header and first messages (seq 1, 2, ...) in one durable
    /// step, with `with` (see `write_durably`). The file is made empty first: a crash before
    /// the journal carries the write out leaves it so, and `load` removes it.
    fn create(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        messages: Vec<Message>,
        with: Vec<Entry>,
    ) -> Result<OpenConversation, StoreError> {
        let file = self.new_file(owner, conversation, &messages)?;
        self.fill(conversation, file, messages, with)
    }

    /// A new conversation's file, created empty, with the bytes that are to fill it.
    fn new_file(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        messages: &[Message],
    ) -> Result<NewFile, StoreError> {
        let header = Header {
            conversation_id: conversation.clone(),
            tenant: owner.tenant.clone(),
            user_id: owner.user_id.clone(),
            created_at: Utc::now(),
            incarnation: Some(uuid::Uuid::now_v7().simple().to_string()),
        };
        let mut bytes = encode(&Record::Conversation(header.clone()))?;
        for message in messages {
            bytes.extend(encode(&Record::Message(message.clone()))?);
        }
        let path = self.path(conversation);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(NewFile {
            header,
            bytes,
            path,
            file,
        })
    }

    /// Writes a new file's bytes durably and opens the conversation; on failure removes it.
    fn fill(
        &self,
        conversation: &ConversationId,
        new: NewFile,
        messages: Vec<Message>,
        with: Vec<Entry>,
    ) -> Result<OpenConversation, StoreError> {
        let len = new.bytes.len() as u64;
        if let Err(e) = self.write_durably(conversation, &new.file, 0, new.bytes, with) {
            let _ = fs::remove_file(&new.path);
            return Err(e.into());
        }
        Ok(self.opened(new.header, len, messages))
    }

    /// A conversation just written whole: `len` bytes, `messages` (seq 1, 2, ...) after its
    /// header.
    fn opened(&self, header: Header, len: u64, messages: Vec<Message>) -> OpenConversation {
        let mut open = OpenConversation {
            header,
            len,
            next_seq: 1,
            ids: IdIndex::default(),
            last_created_at: None,
            recent: VecDeque::new(),
            evicted: false,
            replaced: false,
        };
        for message in messages {
            open.remember(message, self.keep_recent);
        }
        open
    }

    /// The stored copy of message `id`, if the open conversation holds it.
    fn stored(
        &self,
        conversation: &ConversationId,
        open: &OpenConversation,
        id: &str,
    ) -> Result<Option<Message>, StoreError> {
        let candidates: Vec<i64> = open.ids.candidates(id).collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        let holds_id = |m: &Message| m.id == id && candidates.contains(&m.seq);
        if let Some(cached) = open.recent.iter().find(|m| holds_id(m)) {
            return Ok(Some(cached.clone()));
        }
        let all = read_all(&self.path(conversation), open.len)?;
        Ok(candidates
            .iter()
            .filter_map(|seq| all.get(seq))
            .find(|m| holds_id(m))
            .cloned())
    }

    fn find(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        id: &str,
    ) -> Result<Option<Message>, StoreError> {
        self.with_conversation(conversation, |slot| {
            let open = Self::owned(slot, owner)?;
            self.stored(conversation, open, id)
        })
    }

    /// See [`FileStore::apply_remote`].
    fn apply_remote(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        messages: Vec<Message>,
    ) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        let deleted_at = self
            .deletions
            .latest(conversation)
            .filter(|deletion| deletion.user_id == owner.user_id)
            .map(|deletion| deletion.deleted_at);
        let mut incoming = Vec::with_capacity(messages.len());
        for message in messages {
            if deleted_at.is_some_and(|at| message.created_at <= at) {
                applied.dropped += 1;
            } else {
                incoming.push(message);
            }
        }
        if incoming.is_empty() {
            return Ok(applied);
        }
        self.with_conversation(conversation, |slot| {
            let Some(open) = slot.as_mut() else {
                // Each id once, numbered in the order they came.
                let mut seen = HashSet::new();
                let mut fresh = Vec::with_capacity(incoming.len());
                for message in incoming {
                    if seen.insert(message.id.clone()) {
                        fresh.push(message);
                    } else {
                        applied.duplicates += 1;
                    }
                }
                for (i, message) in fresh.iter_mut().enumerate() {
                    message.seq = i as i64 + 1;
                }
                applied.added = fresh.len();
                *slot = Some(self.create(owner, conversation, fresh, Vec::new())?);
                return Ok(());
            };
            if !open.header.is_owned_by(owner) {
                return Err(StoreError::NotFound);
            }
            let mut lines = Vec::new();
            let mut stored = Vec::with_capacity(incoming.len());
            let mut next_seq = open.next_seq;
            let mut batch_ids = HashMap::new();
            for mut message in incoming {
                let (known, here) = match batch_ids.get(&message.id) {
                    Some(&seq) => (Some(seq), None),
                    None => match self.stored(conversation, open, &message.id)? {
                        Some(here) => (Some(here.seq), Some(here)),
                        None => (None, None),
                    },
                };
                match known {
                    Some(seq) => {
                        // Brought earlier in this batch, else as the file has it.
                        let current = stored
                            .iter()
                            .rev()
                            .find(|m: &&Message| m.seq == seq)
                            .cloned()
                            .or(here);
                        if current.is_some_and(|c| c.same_contents(&message)) {
                            applied.duplicates += 1;
                            continue;
                        }
                        // The same message, written differently elsewhere (a turn answered on
                        // both sides while apart): the copy brought from the cloud wins.
                        message.seq = seq;
                        applied.replaced += 1;
                    }
                    None => {
                        message.seq = next_seq;
                        next_seq += 1;
                        batch_ids.insert(message.id.clone(), message.seq);
                        applied.added += 1;
                    }
                }
                lines.extend(encode(&Record::Message(message.clone()))?);
                stored.push(message);
            }
            if lines.is_empty() {
                return Ok(());
            }
            self.append_lines(conversation, slot, lines, Vec::new())?;
            if let Some(open) = slot.as_mut() {
                for message in stored {
                    open.remember(message, self.keep_recent);
                }
            }
            Ok(())
        })?;
        Ok(applied)
    }

    /// Carries out a deletion: the owner's messages in the conversation stamped up to its time
    /// are erased; later ones (written after it, under the same id) stay.
    fn erase_until(&self, deletion: &Deletion) -> Result<(), StoreError> {
        let conversation = &deletion.conversation_id;
        self.with_conversation(conversation, |slot| {
            let Some(open) = slot.as_ref() else {
                return Ok(());
            };
            if open.header.user_id != deletion.user_id {
                return Ok(());
            }
            let all = read_all(&self.path(conversation), open.len)?;
            let (gone, kept): (Vec<Message>, Vec<Message>) = all
                .into_values()
                .partition(|m| m.created_at <= deletion.deleted_at);
            if gone.is_empty() {
                return Ok(());
            }
            if kept.is_empty() {
                self.remove(conversation)?;
                *slot = None;
                return Ok(());
            }
            // Rewritten in one journal entry: a crash leaves the old file or the new one.
            let header = Header {
                incarnation: Some(uuid::Uuid::now_v7().simple().to_string()),
                ..open.header.clone()
            };
            let mut bytes = encode(&Record::Conversation(header))?;
            for message in &kept {
                bytes.extend(encode(&Record::Message(message.clone()))?);
            }
            if bytes.len() > self.journal.max_write(conversation.as_str()) {
                return Err(StoreError::Other(anyhow!(
                    "the messages left after deleting {conversation} are too large to rewrite"
                )));
            }
            *slot = None;
            self.journal.commit(Entry::Replace {
                file: conversation.as_str().to_owned(),
                bytes,
            })?;
            Ok(())
        })
    }

    /// Removes a conversation's file durably (journaled first: after a crash the removal is
    /// done again, and the conversation never comes back from earlier entries).
    fn remove(&self, conversation: &ConversationId) -> Result<(), StoreError> {
        self.journal.commit(Entry::Delete {
            file: conversation.as_str().to_owned(),
        })?;
        Ok(())
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
        let guard = slot.try_lock().ok()?;
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
        let (len, cached) = self.with_conversation(conversation, |slot| {
            let open = Self::owned(slot, owner)?;
            Ok((open.len, open.cached_recent(limit)))
        })?;
        match cached {
            Some(messages) => Ok(messages),
            None => {
                let all = read_all(&self.path(conversation), len)?;
                let skip = all.len().saturating_sub(limit);
                Ok(all.into_values().skip(skip).collect())
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
        let (len, replaced) = self.with_conversation(conversation, |slot| {
            let open = Self::owned(slot, owner)?;
            Ok((open.len, open.replaced))
        })?;
        let path = self.path(conversation);
        if replaced {
            let all = read_all(&path, len)?;
            return Ok(all
                .into_values()
                .filter(|m| m.seq > after_seq)
                .take(limit)
                .collect());
        }
        // Lines come in seq order: the page ends at its last message.
        let mut page = Vec::new();
        read_lines(&path, 0, len, |record| {
            if let Record::Message(m) = record
                && m.seq > after_seq
            {
                page.push(m);
            }
            page.len() < limit
        })?;
        Ok(page)
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
            let open = Self::owned(slot, owner)?;
            // Recorded first, stamped after every message it erases: sync tells the cloud,
            // and no copy synced back later revives what it erased.
            self.deletions.record(Deletion {
                conversation_id: conversation.clone(),
                user_id: owner.user_id.clone(),
                deleted_at: next_created_at(open.last_created_at),
                origin: None,
            })?;
            self.remove(conversation)?;
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
        (limit <= in_memory || !self.evicted).then(|| {
            let skip = in_memory.saturating_sub(limit);
            self.recent.iter().skip(skip).cloned().collect()
        })
    }

    /// Takes a message just stored (or read) into account; one with a seq already known
    /// stands for the earlier copy.
    fn remember(&mut self, message: Message, keep: usize) {
        // Saturating: a damaged or hand-edited file may hold any seq at all.
        self.next_seq = self.next_seq.max(message.seq.saturating_add(1));
        self.last_created_at = self.last_created_at.max(Some(message.created_at));
        if self.ids.holds(&message.id, message.seq) {
            self.replaced = true;
            if let Some(cached) = self.recent.iter_mut().find(|m| m.seq == message.seq) {
                *cached = message;
            }
            return;
        }
        self.ids.insert(&message.id, message.seq);
        if self.recent.len() == keep {
            self.evicted |= self.recent.pop_front().is_some();
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

/// Makes room for `len` bytes at `offset` in `file` without changing its size, so that
/// writing them later cannot meet a full disk. Where the filesystem cannot (no `fallocate`),
/// the write itself will tell.
/// The journal entry that puts `bytes` at `offset` in the conversation's file, with `with` in
/// the same record when there is any (see `Inner::write_durably`).
fn journal_write(
    conversation: &ConversationId,
    offset: u64,
    bytes: Vec<u8>,
    with: Vec<Entry>,
) -> Entry {
    let write = Entry::Write {
        file: conversation.as_str().to_owned(),
        offset,
        bytes,
    };
    if with.is_empty() {
        write
    } else {
        Entry::Group([vec![write], with].concat())
    }
}

/// A reply's line of the cost ledger, when it is `priced`: to be durable with the reply.
fn ledger_lines(
    conversation: &ConversationId,
    message: &Message,
    priced: Option<&Priced>,
) -> Result<Vec<Entry>, StoreError> {
    let Some(priced) = priced else {
        return Ok(Vec::new());
    };
    let usage = message.usage.unwrap_or_default();
    let line = ledger_entry(&UsageRecord {
        ts: message.created_at,
        request_id: &priced.request_id,
        conversation_id: Some(conversation),
        user_id: &priced.user_id,
        surface_id: &priced.surface_id,
        model: message.model.as_deref().unwrap_or_default(),
        latency_ms: priced.latency_ms,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cost_usd: usage.cost_usd,
    })?;
    Ok(vec![line])
}

fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    use rustix::io::Errno;
    match fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
        Err(Errno::OPNOTSUPP | Errno::NOSYS) | Ok(()) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The journal entry for one line of the cost ledger.
fn ledger_entry(record: &UsageRecord<'_>) -> Result<Entry, StoreError> {
    Ok(Entry::Append {
        file: LEDGER.to_owned(),
        bytes: usage_log::line(record).context("cannot encode a usage record")?,
    })
}

/// The store's files, by the names the journal gives them: a conversation by its id, the cost
/// ledger (`maestra_metrics.jsonl` in the data folder, the conversations folder's parent) and
/// the idempotency records (in its `idempotency` folder) by names no conversation id has.
struct StoreFiles {
    conversations: PathBuf,
    ledger_path: PathBuf,
    idempotency: PathBuf,
    /// The ledger, opened for appending: each line goes in one `write`, so lines never mix.
    ledger: File,
}

impl StoreFiles {
    fn new(conversations: &Path) -> io::Result<Self> {
        let data = conversations.parent().unwrap_or(conversations);
        let ledger_path = data.join(LEDGER_FILE);
        let ledger = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&ledger_path)?;
        Ok(Self {
            conversations: conversations.to_owned(),
            ledger_path,
            idempotency: data.join("idempotency"),
            ledger,
        })
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        if name == LEDGER {
            return Some(self.ledger_path.clone());
        }
        if let Some(key) = name.strip_prefix(IDEMPOTENCY) {
            let hex = !key.is_empty() && key.bytes().all(|b| b.is_ascii_hexdigit());
            return hex.then(|| self.idempotency.join(format!("{key}.{FILE_EXTENSION}")));
        }
        ConversationId::parse(name)
            .is_ok()
            .then(|| file_path(&self.conversations, name))
    }

    fn path_of(&self, change: &Entry) -> io::Result<PathBuf> {
        self.path(change.file()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a journal entry names no file of the store",
            )
        })
    }

    /// Applies what the journal kept from a run that did not stop cleanly, in order: each write
    /// stands in its file again (the page cache may have lost it), each removal is done again,
    /// each ledger line not in the ledger yet is added.
    fn apply_recovered(&self, entries: &[Entry]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut touched = HashSet::new();
        let mut rewritten = 0;
        let mut ledger_lines: Option<HashSet<Vec<u8>>> = None;
        for entry in entries {
            let Some(path) = self.path(entry.file()) else {
                tracing::warn!("skipping a journal entry that names no file of the store");
                continue;
            };
            match entry {
                Entry::Write { offset, bytes, .. } => {
                    if restore(&path, *offset, bytes)? {
                        rewritten += 1;
                    }
                }
                Entry::Delete { .. } => match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
                Entry::Replace { bytes, .. } => {
                    replace_file(&path, bytes)?;
                    rewritten += 1;
                }
                Entry::Append { bytes, .. } => {
                    let lines = match &mut ledger_lines {
                        Some(lines) => lines,
                        None => ledger_lines.insert(self.ledger_lines()?),
                    };
                    if lines.insert(bytes.clone()) {
                        (&self.ledger).write_all(bytes)?;
                        rewritten += 1;
                    }
                }
                Entry::Group(_) => {} // `recover` hands their changes one by one
            }
            if !matches!(entry, Entry::Delete { .. }) {
                touched.insert(entry.file().to_owned());
            }
        }
        self.flush(&touched)?;
        tracing::info!(
            entries = entries.len(),
            rewritten,
            "applied the store's journal left by a run that did not stop cleanly"
        );
        Ok(())
    }
}

impl StoreFiles {
    /// The ledger's whole lines, after cutting off a torn last one: every line comes from a
    /// journal record, so one torn by a crash is still in the journal, and written again.
    fn ledger_lines(&self) -> io::Result<HashSet<Vec<u8>>> {
        let bytes = fs::read(&self.ledger_path)?;
        let whole = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |end| end + 1);
        if whole < bytes.len() {
            tracing::warn!("dropping a torn last line of the ledger");
            self.ledger.set_len(whole as u64)?;
        }
        Ok(bytes[..whole]
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect())
    }
}

impl Files for StoreFiles {
    fn reserve(&self, appends: &[&Entry]) -> io::Result<()> {
        let len = appends
            .iter()
            .map(|append| match append {
                Entry::Append { bytes, .. } => bytes.len() as u64,
                _ => 0,
            })
            .sum();
        reserve(&self.ledger, self.ledger.metadata()?.len(), len)
    }

    fn apply(&self, change: &Entry) -> io::Result<()> {
        let path = self.path_of(change)?;
        match change {
            Entry::Write { offset, bytes, .. } => OpenOptions::new()
                .write(true)
                .create(*offset == 0)
                .truncate(false)
                .mode(0o600)
                .open(&path)?
                .write_all_at(bytes, *offset),
            Entry::Delete { .. } => match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            Entry::Replace { bytes, .. } => replace_file(&path, bytes),
            Entry::Append { .. } if path != self.ledger_path => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "only the ledger is appended to",
            )),
            Entry::Append { bytes, .. } => (&self.ledger).write_all(bytes),
            Entry::Group(_) => Err(io::Error::other("a group is applied change by change")),
        }
    }

    /// Makes the named files, and the folders' entries, durable: the journal's checkpoint. A
    /// file deleted since has nothing left to flush. Idempotency records are not flushed: they
    /// may be lost in a crash anyway (they ride, `FileIdempotency`), and a flush each would
    /// cost a keyed request one more flush than a request without a key.
    fn flush(&self, files: &HashSet<String>) -> io::Result<()> {
        for name in files {
            if name.starts_with(IDEMPOTENCY) {
                continue;
            }
            let Some(path) = self.path(name) else {
                continue;
            };
            match File::open(path) {
                Ok(file) => file.sync_data()?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        sync_dir(&self.conversations)
    }
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
    let file_len = file.metadata()?.len();
    if offset > file_len {
        // Every write starts where the file then ended, and the journal's writes are applied
        // in order: one beyond the end is damage whose checksum happened to match. Written, it
        // would leave a hole, possibly of terabytes, for loading to read.
        tracing::warn!(file = %path.display(), offset, "skipping a journal entry beyond its file's end");
        return Ok(false);
    }
    if file_len >= offset.saturating_add(bytes.len() as u64) {
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
    let mut messages = Vec::new();
    while let Some(complete) = next_line(&mut reader, &mut line)? {
        if !complete {
            break; // torn tail: never acknowledged
        }
        let record_len = line.len() as u64;
        match (serde_json::from_slice::<Record>(&line), &header) {
            (Ok(Record::Conversation(h)), None) => header = Some(h),
            (Ok(Record::Message(m)), Some(_)) => messages.push(m),
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
    let mut open = OpenConversation {
        header,
        len,
        next_seq: 1,
        ids: IdIndex::default(),
        last_created_at: None,
        recent: VecDeque::with_capacity(keep_recent),
        evicted: false,
        replaced: false,
    };
    for message in messages {
        open.remember(message, keep_recent);
    }
    Ok(Some(open))
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

/// Reads the records between byte `from` and byte `to` of a conversation file (whole lines
/// only; an unreadable one is skipped) until `each` says stop, and returns where the last line
/// read ends.
fn read_lines(
    path: &Path,
    from: u64,
    to: u64,
    mut each: impl FnMut(Record) -> bool,
) -> Result<u64, StoreError> {
    let mut file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound,
        _ => e.into(),
    })?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = BufReader::new(file.take(to.saturating_sub(from)));
    let mut line = Vec::new();
    let mut end = from;
    while let Some(true) = next_line(&mut reader, &mut line)? {
        end += line.len() as u64;
        if let Ok(record) = serde_json::from_slice(&line)
            && !each(record)
        {
            break;
        }
    }
    Ok(end)
}

/// Every message among the first `len` bytes of a conversation file, by seq; a later copy of
/// a seq (sync's replacement) stands for the earlier one.
fn read_all(path: &Path, len: u64) -> Result<BTreeMap<i64, Message>, StoreError> {
    let mut messages = BTreeMap::new();
    read_lines(path, 0, len, |record| {
        if let Record::Message(m) = record {
            messages.insert(m.seq, m);
        }
        true
    })?;
    Ok(messages)
}

/// Makes the file hold exactly `bytes` (a rewrite the journal already holds).
fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.write_all_at(bytes, 0)?;
    file.set_len(bytes.len() as u64)?;
    Ok(())
}

/// For the fuzz targets (fuzz/, `super::fuzzing`): a conversation file loaded as the store
/// opens it, then read back as history and sync read it; the length of its whole records, or
/// `None` when it holds no conversation.
#[cfg(fuzzing)]
pub(super) fn load_for_fuzzing(path: &Path, keep_recent: usize) -> Result<Option<u64>, StoreError> {
    let Some(open) = load(path, keep_recent)? else {
        return Ok(None);
    };
    read_header(path)?;
    read_all(path, open.len)?;
    let recent = open.cached_recent(keep_recent).unwrap_or_default();
    assert!(
        recent.len() <= keep_recent,
        "more recent messages kept than asked"
    );
    Ok(Some(open.len))
}

/// For the journal_replay fuzz target: what opening the store applies of the journal, the
/// ledger and idempotency records beside `dir` included.
#[cfg(fuzzing)]
pub(super) fn apply_for_fuzzing(dir: &Path, entries: &[Entry]) -> io::Result<()> {
    StoreFiles::new(dir)?.apply_recovered(entries)
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
            id: None,
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
    async fn a_reply_and_its_ledger_line_come_back_together_and_once_after_a_crash() {
        let (data, conversations, journal) = folders();
        let ledger = data.path().join(LEDGER_FILE);
        let ledger_lines = || -> Vec<serde_json::Value> {
            fs::read_to_string(&ledger)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        };
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        let ana = owner();
        store.append(&ana, &id("conv_a"), say("hi")).await.unwrap();
        let reply = NewMessage::from_assistant(
            SurfaceId::parse("cli").unwrap(),
            "hello".to_owned(),
            "m".to_owned(),
            crate::domain::Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cost_usd: 0.25,
            },
        );
        let priced = Priced {
            request_id: "req_1".into(),
            user_id: ana.user_id.clone(),
            surface_id: "cli".into(),
            latency_ms: 12.0,
        };
        let stored = store
            .append_reply(&ana, &id("conv_a"), reply, priced.clone())
            .await
            .unwrap()
            .message;
        let written = ledger_lines();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0]["cost_usd"], 0.25);
        assert_eq!(written[0]["conversation_id"], "conv_a");
        assert_eq!(
            written[0]["ts"]
                .as_str()
                .unwrap()
                .parse::<DateTime<Utc>>()
                .unwrap(),
            stored.created_at
        );
        store.inner.journal.abandon();
        drop(store);

        // A power cut: the reply's line gone from the conversation, the ledger's torn.
        let file = conversations.join("conv_a.json");
        let whole = fs::read(&file).unwrap();
        let first_two = whole.iter().filter(|&&b| b == b'\n').take(2).count();
        assert_eq!(first_two, 2);
        let cut = whole
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(1)
            .unwrap()
            .0
            + 1;
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        let line = fs::read(&ledger).unwrap();
        fs::write(&ledger, &line[..line.len() / 2]).unwrap();

        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        assert_eq!(
            contents(&store, "conv_a").await,
            [(1, "hi".to_owned()), (2, "hello".to_owned())]
        );
        assert_eq!(ledger_lines(), written, "the line whole, once");

        // Another reply, then a crash that lost nothing: its line, there already, stays once.
        let again = NewMessage::from_assistant(
            SurfaceId::parse("cli").unwrap(),
            "again".to_owned(),
            "m".to_owned(),
            crate::domain::Usage::default(),
        );
        store
            .append_reply(&ana, &id("conv_a"), again, priced)
            .await
            .unwrap();
        store.inner.journal.abandon();
        drop(store);
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        assert_eq!(ledger_lines().len(), 2);
        assert_eq!(contents(&store, "conv_a").await.len(), 3);
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

    fn remote(id: &str, text: &str, created_at: DateTime<Utc>) -> Message {
        Message {
            id: id.to_owned(),
            seq: 0,
            role: Role::Assistant,
            surface_id: SurfaceId::parse("mobile").unwrap(),
            content: text.to_owned(),
            created_at,
            model: Some("m".to_owned()),
            usage: None,
            origin: Some("cloud".to_owned()),
        }
    }

    #[tokio::test]
    async fn a_message_with_an_id_already_stored_is_found_not_stored_twice() {
        let (_data, conversations, journal) = folders();
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        let conv = id("conv_once");
        let with_id = || say("hello").with_id(Some("msg_fixed".to_owned()));
        let first = store.append_once(&owner(), &conv, with_id()).await.unwrap();
        let again = store.append_once(&owner(), &conv, with_id()).await.unwrap();
        assert!(!first.existed && again.existed);
        assert_eq!(again.message, first.message);
        assert_eq!(contents(&store, "conv_once").await.len(), 1);
        drop(store);
        // Also once the conversation is read back from disk.
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        assert!(
            store
                .append_once(&owner(), &conv, with_id())
                .await
                .unwrap()
                .existed
        );
        assert_eq!(
            store.find(&owner(), &conv, "msg_fixed").await.unwrap(),
            Some(first.message)
        );
    }

    /// Ids are kept as fingerprints: where two share one, each is still found at its own
    /// seq, and an id never stored is still new (here every id shares one).
    #[tokio::test]
    #[allow(
        clippy::await_holding_lock,
        reason = "the test's own runtime has one thread; the lock only orders tests"
    )]
    async fn ids_sharing_a_fingerprint_are_each_found_and_a_new_one_is_stored() {
        let _all = super::super::id_index::collisions::everywhere();
        let (_data, conversations, journal) = folders();
        let conv = id("conv_shared");
        let with_id = |n: usize| say(&format!("m{n}")).with_id(Some(format!("msg_{n}")));
        let store = FileStore::open(&conversations, &journal, 2).unwrap();
        let mut first = Vec::new();
        for n in 1..=5 {
            let appended = store
                .append_once(&owner(), &conv, with_id(n))
                .await
                .unwrap();
            assert!(!appended.existed);
            first.push(appended.message);
        }
        let later = first[4].created_at + chrono::Duration::seconds(1);
        let applied = store
            .apply_remote(
                &owner(),
                &conv,
                vec![
                    first[1].clone(),
                    remote("msg_new", "from the cloud", later),
                    remote("msg_4", "the cloud's copy", later),
                ],
            )
            .await
            .unwrap();
        assert_eq!((applied.added, applied.duplicates), (1, 1));
        assert_eq!(applied.replaced, 1);
        first[3] = store.find(&owner(), &conv, "msg_4").await.unwrap().unwrap();
        assert_eq!((first[3].seq, &*first[3].content), (4, "the cloud's copy"));
        drop(store);

        // Read back from disk too, where only the last two are in memory.
        let store = FileStore::open(&conversations, &journal, 2).unwrap();
        for (n, message) in (1..=5).zip(&first) {
            let again = store
                .append_once(&owner(), &conv, with_id(n))
                .await
                .unwrap();
            assert!(again.existed);
            assert_eq!(&again.message, message);
            let found = store.find(&owner(), &conv, &format!("msg_{n}")).await;
            assert_eq!(found.unwrap().as_ref(), Some(message));
        }
        assert_eq!(store.find(&owner(), &conv, "msg_9").await.unwrap(), None);
        let fresh = store
            .append_once(&owner(), &conv, with_id(9))
            .await
            .unwrap();
        assert_eq!((fresh.existed, fresh.message.seq), (false, 7));
        assert_eq!(contents(&store, "conv_shared").await.len(), 7);
    }

    /// Thousands of turns in flight each wait for the journal's flush: an append to an open
    /// conversation waits without a thread of the blocking pool (here its only one is taken).
    #[test]
    fn appends_to_open_conversations_wait_for_their_flush_without_a_blocking_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (_data, conversations, journal) = folders();
            let store = FileStore::open(&conversations, &journal, 20).unwrap();
            let ids: Vec<_> = (0..16).map(|i| id(&format!("conv_{i}"))).collect();
            for conv in &ids {
                store
                    .append_once(&owner(), conv, say("first"))
                    .await
                    .unwrap();
            }
            let (release, held) = std::sync::mpsc::channel::<()>();
            let taken = tokio::task::spawn_blocking(move || held.recv());
            let ana = owner();
            let appends = ids
                .iter()
                .map(|conv| store.append_once(&ana, conv, say("second")));
            let appended = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                futures_util::future::join_all(appends),
            )
            .await
            .expect("the appends waited for the blocking pool");
            release.send(()).unwrap();
            taken.await.unwrap().unwrap();
            for (conv, appended) in ids.iter().zip(appended) {
                assert_eq!(appended.unwrap().message.seq, 2);
                assert_eq!(
                    contents(&store, conv.as_str()).await,
                    [(1, "first".to_owned()), (2, "second".to_owned())]
                );
            }
        });
    }

    #[tokio::test]
    async fn synced_messages_are_added_once_and_the_clouds_copy_replaces_a_different_one() {
        let (_data, conversations, journal) = folders();
        let store = FileStore::open(&conversations, &journal, 2).unwrap();
        let conv = id("conv_sync");
        let mine = store
            .append_once(
                &owner(),
                &conv,
                say("mine").with_id(Some("msg_same".to_owned())),
            )
            .await
            .unwrap()
            .message;
        let later = mine.created_at + chrono::Duration::seconds(1);
        let applied = store
            .apply_remote(
                &owner(),
                &conv,
                vec![
                    remote("msg_new", "from the cloud", later),
                    remote("msg_same", "the cloud's copy", later),
                    remote("msg_new", "from the cloud", later),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            applied,
            Applied {
                added: 1,
                duplicates: 1,
                replaced: 1,
                dropped: 0
            }
        );
        let expect = [
            (1, "the cloud's copy".to_owned()),
            (2, "from the cloud".to_owned()),
        ];
        assert_eq!(contents(&store, "conv_sync").await, expect);
        // A local message after them is stamped after them (the conversation's clock).
        let next = store.append(&owner(), &conv, say("next")).await.unwrap();
        assert!(next.created_at > later);
        drop(store);
        let store = FileStore::open(&conversations, &journal, 2).unwrap();
        assert_eq!(contents(&store, "conv_sync").await[..2], expect);
        let again = store
            .apply_remote(
                &owner(),
                &conv,
                vec![remote("msg_new", "from the cloud", later)],
            )
            .await
            .unwrap();
        assert_eq!(again.duplicates, 1);
    }

    #[tokio::test]
    async fn a_deletion_from_elsewhere_erases_what_it_saw_and_keeps_what_came_after() {
        let (_data, conversations, journal) = folders();
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        let conv = id("conv_gone");
        let old = store.append(&owner(), &conv, say("old")).await.unwrap();
        let deleted_at = old.created_at + chrono::Duration::milliseconds(1);
        let newer = remote(
            "msg_newer",
            "after the deletion",
            deleted_at + chrono::Duration::seconds(1),
        );
        store
            .apply_remote(&owner(), &conv, vec![newer.clone()])
            .await
            .unwrap();
        let deletion = Deletion {
            conversation_id: conv.clone(),
            user_id: owner().user_id,
            deleted_at,
            origin: Some("cloud".to_owned()),
        };
        store.apply_remote_deletion(deletion.clone()).await.unwrap();
        assert_eq!(
            contents(&store, "conv_gone").await,
            [(2, "after the deletion".to_owned())],
            "seqs already handed out stay"
        );
        // An old copy brought again is not stored; the deletion survives a crash.
        let applied = store
            .apply_remote(
                &owner(),
                &conv,
                vec![remote("msg_stale", "stale", old.created_at)],
            )
            .await
            .unwrap();
        assert_eq!(applied.dropped, 1);
        store.inner.journal.abandon();
        drop(store);
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        assert_eq!(
            contents(&store, "conv_gone").await,
            [(2, "after the deletion".to_owned())]
        );
        assert_eq!(store.deletions().latest(&conv), Some(deletion));
        let next = store.append(&owner(), &conv, say("again")).await.unwrap();
        assert_eq!(next.seq, 3);
    }

    #[tokio::test]
    async fn a_conversation_deleted_here_is_remembered_and_a_new_one_with_its_id_comes_after() {
        let (_data, conversations, journal) = folders();
        let store = FileStore::open(&conversations, &journal, 20).unwrap();
        let conv = id("conv_del");
        let first = store.append(&owner(), &conv, say("first")).await.unwrap();
        store.delete(&owner(), &conv).await.unwrap();
        let deletion = store.deletions().latest(&conv).unwrap();
        assert!(deletion.deleted_at > first.created_at && deletion.origin.is_none());
        let again = store.append(&owner(), &conv, say("anew")).await.unwrap();
        assert_eq!(again.seq, 1);
        assert!(again.created_at > deletion.deleted_at);
        let (written, _) = store.deletions().since(0).unwrap();
        assert_eq!(written, [deletion]);
    }

    const HEADER_LINE: &[u8] = b"{\"type\":\"conversation\",\"conversation_id\":\"conv_a\",\"tenant\":\"local\",\"user_id\":\"ana\",\"created_at\":\"2026-12-07T18:00:00Z\"}\n";

    /// Found by the journal_replay fuzz target (fuzz/): a write whose checksum matched but whose
    /// offset (0x7b00000000000000 there) lay far beyond its file's end left a hole, terabytes
    /// on a file system with sparse files, that loading then read into memory (out of memory).
    #[test]
    fn a_journal_write_beyond_its_files_end_is_skipped_not_a_hole() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("conversations");
        fs::create_dir(&dir).unwrap();
        let write = |offset: u64, bytes: &[u8]| Entry::Write {
            file: "conv_a".into(),
            offset,
            bytes: bytes.to_vec(),
        };
        let line = b"{\"type\":\"message\"}\n";
        let entries = [
            write(0, HEADER_LINE),
            write(0x7b00_0000_0000_0000, line),
            write(u64::MAX, line),
            write(HEADER_LINE.len() as u64 + 1, line),
            write(HEADER_LINE.len() as u64, line), // where the file ends: written
        ];
        StoreFiles::new(&dir)
            .unwrap()
            .apply_recovered(&entries)
            .unwrap();
        let path = file_path(&dir, "conv_a");
        assert_eq!(fs::read(&path).unwrap(), [HEADER_LINE, line].concat());
        assert_eq!(
            load(&path, 4).unwrap().map(|open| open.len),
            Some((HEADER_LINE.len() + line.len()) as u64)
        );
    }

    /// Found with the conversation_file fuzz target's harness (fuzz/): a damaged file holding
    /// the largest seq overflowed the next one (a panic with overflow checks, a negative seq
    /// without).
    #[test]
    fn a_file_holding_the_largest_seq_and_time_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_path(dir.path(), "conv_a");
        let message = format!(
            "{{\"type\":\"message\",\"id\":\"m\",\"seq\":9223372036854775807,\"role\":\"user\",\
             \"surface_id\":\"cli\",\"content\":\"hi\",\"created_at\":{}}}\n",
            serde_json::to_string(&DateTime::<Utc>::MAX_UTC).unwrap()
        );
        fs::write(&path, [HEADER_LINE, message.as_bytes()].concat()).unwrap();
        let open = load(&path, 4).unwrap().unwrap();
        assert_eq!(open.next_seq, i64::MAX);
        // The next message's time after the clock's last one: not an overflow either.
        let last = open.last_created_at;
        assert!(last.is_some());
        assert_eq!(Some(next_created_at(last)), last);
    }
}
