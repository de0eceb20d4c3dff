//! Group commit for the local store: one write-ahead journal makes many appends durable with one
//! flush.
//!
//! Write-ahead: a change to the store's files (a conversation's new line, a line of the cost
//! ledger, an idempotency record) goes to the journal first, and only once the journal has
//! flushed it does the journal carry it out in the file (into the page cache, see [`Files`]).
//! So whatever a crash — a killed process or a lost machine — leaves in the files, the journal
//! holds or held it: a change is never half there, and a [`Entry::Group`] of changes (a reply
//! and its ledger line) is there whole or not at all. One flush at a time writes everything
//! gathered since the last one, so concurrent appends to different conversations share a
//! single `fdatasync` and flushes never queue in the device. A blocking caller runs a flush
//! itself when none is under way; an async one waits without a thread, its flush run by the
//! journal's flusher thread. The journal is two zero-filled segments overwritten in place: a
//! flush writes data only, never a file size or a block map.
//!
//! When the active segment is full the journal moves on to the other one, and a checkpointer
//! thread flushes the files the full segment touched (all of its entries were carried out
//! before the switch); then that segment is erased and may be reused. After a crash, [`recover`] returns the entries of the live segments,
//! oldest first, for the store to apply again: every acknowledged write is among them.
//!
//! Segment: a header (magic, version, generation, live flag, CRC) in the first `HEADER_LEN`
//! bytes, then records, each `len u32 | generation u64 | crc u32 | payload`. Generations grow
//! across segments and runs; a record counts only if it carries its segment's generation and its
//! CRC matches, so what an earlier cycle left further on is never read as new.
//!
//! A full disk (ENOSPC, EDQUOT) while writing records — on a filesystem where overwriting a
//! preallocated file still needs new blocks: copy-on-write ones, or sparse segments — refuses
//! the batch being written and nothing else: its callers get the error, the journal goes on.
//! The refused bytes may lie, partly written, after the last durable record; the next write
//! starts with a padding record covering them exactly, so that none of them can ever be read
//! as a record. A failed flush (`fdatasync`) still stops the journal for good: what the disk
//! holds after it cannot be known.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

/// Each of the two segments, by default: about 4,000 turns of ordinary length.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 << 20;
const SEGMENTS: usize = 2;
const MAGIC: &[u8; 8] = b"MAESTRAJ";
const VERSION: u32 = 1;
/// The header has a block of its own, so rewriting it never touches a record.
const HEADER_LEN: u64 = 4096;
const FRAME_LEN: usize = 4 + 8 + 4;
const WRITE: u8 = 1;
const DELETE: u8 = 2;
const REPLACE: u8 = 3;
/// A record that stands for nothing: covers bytes a refused write may have left.
const PAD: u8 = 4;
const GROUP: u8 = 5;
const APPEND: u8 = 6;
/// The smallest record: a frame, a kind and an id length.
const MIN_RECORD: u64 = FRAME_LEN as u64 + 2;

/// One change to a file of the store, as the journal keeps it. `file` names the file; what a
/// name stands for is the store's business ([`Files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `bytes` stand in the file at `offset` (0 creates the file).
    Write {
        file: String,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// The file is removed.
    Delete { file: String },
    /// The file holds `bytes` and nothing else: rewritten in one entry, so that a crash leaves
    /// either the old file or the new one.
    Replace { file: String, bytes: Vec<u8> },
    /// `bytes` (whole lines) go at the end of the file, wherever it ends then: for a file that
    /// many write to at once, like the cost ledger. Applied again after a crash only if the
    /// file does not hold them yet.
    Append { file: String, bytes: Vec<u8> },
    /// Changes that are durable together or not at all (one record), carried out in order.
    /// A group holds no group.
    Group(Vec<Entry>),
}

impl Entry {
    /// The file it changes; empty for a group.
    pub fn file(&self) -> &str {
        match self {
            Entry::Write { file, .. }
            | Entry::Delete { file }
            | Entry::Replace { file, .. }
            | Entry::Append { file, .. } => file,
            Entry::Group(_) => "",
        }
    }

    /// The changes it stands for, a group's one by one.
    pub fn changes(&self) -> &[Entry] {
        match self {
            Entry::Group(entries) => entries,
            single => std::slice::from_ref(single),
        }
    }

    /// Kind, name length, name: what every entry starts with.
    fn head_len(file: &str) -> usize {
        2 + file.len()
    }

    fn encoded_len(&self) -> usize {
        let head = Self::head_len(self.file());
        match self {
            Entry::Write { bytes, .. } => head + 8 + bytes.len(),
            Entry::Delete { .. } => head,
            Entry::Replace { bytes, .. } | Entry::Append { bytes, .. } => head + bytes.len(),
            Entry::Group(entries) => {
                head + entries.iter().map(|e| 4 + e.encoded_len()).sum::<usize>()
            }
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let name = self.file().as_bytes();
        // Names are at most 128 bytes (domain::ConversationId) or the store's own short ones.
        let name_len = u8::try_from(name.len()).unwrap_or(u8::MAX);
        let kind = match self {
            Entry::Write { .. } => WRITE,
            Entry::Delete { .. } => DELETE,
            Entry::Replace { .. } => REPLACE,
            Entry::Append { .. } => APPEND,
            Entry::Group(_) => GROUP,
        };
        out.extend([kind, name_len]);
        out.extend(&name[..usize::from(name_len)]);
        match self {
            Entry::Write { offset, bytes, .. } => {
                out.extend(offset.to_le_bytes());
                out.extend(bytes);
            }
            Entry::Delete { .. } => {}
            Entry::Replace { bytes, .. } | Entry::Append { bytes, .. } => out.extend(bytes),
            Entry::Group(entries) => {
                for entry in entries {
                    let len = u32::try_from(entry.encoded_len()).unwrap_or(u32::MAX);
                    out.extend(len.to_le_bytes());
                    entry.encode_into(out);
                }
            }
        }
    }

    fn decode(payload: &[u8]) -> Option<Entry> {
        let (&kind, rest) = payload.split_first()?;
        let (&name_len, rest) = rest.split_first()?;
        let (name, rest) = rest.split_at_checked(usize::from(name_len))?;
        let file = String::from_utf8(name.to_vec()).ok()?;
        match kind {
            WRITE => {
                let (offset, bytes) = rest.split_first_chunk::<8>()?;
                Some(Entry::Write {
                    file,
                    offset: u64::from_le_bytes(*offset),
                    bytes: bytes.to_vec(),
                })
            }
            DELETE if rest.is_empty() => Some(Entry::Delete { file }),
            REPLACE => Some(Entry::Replace {
                file,
                bytes: rest.to_vec(),
            }),
            APPEND => Some(Entry::Append {
                file,
                bytes: rest.to_vec(),
            }),
            GROUP if file.is_empty() => {
                let mut entries = Vec::new();
                let mut rest = rest;
                while let Some((len, after)) = rest.split_first_chunk::<4>() {
                    let (entry, after) =
                        after.split_at_checked(u32::from_le_bytes(*len) as usize)?;
                    match Entry::decode(entry)? {
                        Entry::Group(_) => return None,
                        entry => entries.push(entry),
                    }
                    rest = after;
                }
                rest.is_empty().then_some(Entry::Group(entries))
            }
            _ => None,
        }
    }
}

/// What the journal does to the files its entries name: the store's side of it.
pub trait Files: Send + Sync + 'static {
    /// Before a batch is written: makes room for what its `Append`s will add (a full disk
    /// refuses the batch here, before anything is durable). Other entries' room is made by
    /// their callers, before they commit.
    fn reserve(&self, appends: &[&Entry]) -> io::Result<()>;
    /// Carries out a durable change (never a group: its changes come one by one). It must
    /// not fail on a full disk: room was made before.
    fn apply(&self, change: &Entry) -> io::Result<()>;
    /// Makes the named files durable: the checkpoint of a full segment.
    fn flush(&self, files: &HashSet<String>) -> io::Result<()>;
}

pub struct Journal {
    shared: Arc<Shared>,
    capacity: usize,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    segments: [File; SEGMENTS],
    files: Arc<dyn Files>,
    state: Mutex<State>,
    /// Held by the one caller that writes and flushes for everybody (see `Journal::commit`).
    writer: Mutex<Writer>,
    /// The checkpointer waits here for a full segment.
    to_checkpoint: Condvar,
    /// The flusher waits here for a flush an async caller asked for.
    to_flush: Condvar,
    /// Callers wait here for their flush, the writer for a clean segment.
    progress: Condvar,
    /// Async callers (`Journal::commit_async`) wait here for their flush.
    settled: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    pending: Vec<Entry>,
    /// Entries nobody waits for (`Journal::ride`), written with the next batch.
    riding: Vec<Entry>,
    /// Entries handed in so far, and how many of them are settled: durable, or refused (see
    /// `refused`).
    submitted: u64,
    durable: u64,
    /// Batches refused because the disk was full, by their entries' tickets; each is dropped
    /// once all its callers have been told.
    refused: Vec<Refusal>,
    /// Whether a caller is writing and flushing right now.
    flushing: bool,
    /// Set once, by a failed write or flush; everything fails after it.
    failure: Option<String>,
    /// Set by `close`: no new commit, no new flush.
    stopping: bool,
    /// A flush asked for by an async caller, for the flusher thread to run.
    flush_wanted: bool,
    /// Set by `close` once no flush is under way: the checkpointer and the flusher may exit.
    threads_done: bool,
    /// A full segment waiting to be checkpointed, with the files it touched.
    checkpoint: Option<(usize, HashSet<String>)>,
    /// Which segments hold nothing a crash would need (so may be overwritten).
    clean: [bool; SEGMENTS],
}

/// Entries `after + 1 ..= through` were refused: the disk was full.
struct Refusal {
    after: u64,
    through: u64,
    /// Callers not yet told.
    waiting: u64,
    kind: io::ErrorKind,
    message: String,
}

impl State {
    /// The error for a refused ticket, if it was refused.
    fn refusal(&mut self, ticket: u64) -> Option<io::Error> {
        let index = self
            .refused
            .iter()
            .position(|r| r.after < ticket && ticket <= r.through)?;
        let refusal = &mut self.refused[index];
        let error = io::Error::new(refusal.kind, refusal.message.clone());
        refusal.waiting -= 1;
        if refusal.waiting == 0 {
            self.refused.swap_remove(index);
        }
        Some(error)
    }
}

/// What a caller waiting for its ticket does next.
enum Step {
    Settled(io::Result<()>),
    /// A flush is under way: its end wakes the caller.
    Wait,
    /// Nobody is flushing: the caller starts a flush (`Shared::flush_round`), marked as under
    /// way already.
    Lead,
}

impl State {
    fn next_step(&mut self, ticket: u64) -> Step {
        // Settled first: an entry flushed before a failure was still made durable.
        if self.durable >= ticket {
            return Step::Settled(self.refusal(ticket).map_or(Ok(()), Err));
        }
        if let Some(failure) = &self.failure {
            return Step::Settled(Err(io::Error::other(failure.clone())));
        }
        if self.flushing {
            return Step::Wait;
        }
        if self.stopping {
            return Step::Settled(Err(io::Error::other("the store is closed")));
        }
        self.flushing = true;
        Step::Lead
    }
}

/// The disk (or the user's quota) is full: retrying once space is freed may succeed.
pub fn is_storage_full(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// An error after which the journal must stop for good, whatever its kind.
fn fatal(error: io::Error) -> io::Error {
    if is_storage_full(&error) {
        io::Error::other(error)
    } else {
        error
    }
}

/// Where the journal writes next.
struct Writer {
    segment_bytes: u64,
    active: usize,
    generation: u64,
    /// Where the next record goes in the active segment.
    position: u64,
    /// Files the active segment has touched.
    touched: HashSet<String>,
    buffer: Vec<u8>,
    /// After a refused write: the end of what it may have left in the active segment, which
    /// the next write covers.
    dirty_until: u64,
    /// After a clean stop nothing more may be written: the journal is erased.
    closed: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait<'a>(condvar: &Condvar, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    condvar.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

fn segment_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("segment-{index}"))
}

/// What a previous run left in the journal folder.
pub struct Recovered {
    /// The live segments' changes (a group's one by one), oldest first: to be applied again.
    pub entries: Vec<Entry>,
    /// Each segment's generation, where its header could be read; a new run counts on from
    /// the highest.
    generations: [Option<u64>; SEGMENTS],
}

/// Reads what the journal in `dir` holds (nothing if it has no segments yet).
pub fn recover(dir: &Path) -> io::Result<Recovered> {
    let mut live = Vec::new();
    let mut generations = [None; SEGMENTS];
    for (index, generation) in generations.iter_mut().enumerate() {
        let bytes = match std::fs::read(segment_path(dir, index)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let Some(header) = Header::decode(&bytes) else {
            continue; // never written, or torn while being replaced: nothing acknowledged in it
        };
        *generation = Some(header.generation);
        if header.live {
            live.push((header.generation, read_records(&bytes, header.generation)));
        }
    }
    live.sort_by_key(|(generation, _)| *generation);
    Ok(Recovered {
        entries: live.into_iter().flat_map(|(_, entries)| entries).collect(),
        generations,
    })
}

/// The entries of one segment, up to the first record that is not of its generation or whole.
fn read_records(segment: &[u8], generation: u64) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut rest = segment.get(HEADER_LEN as usize..).unwrap_or_default();
    while let Some((frame, after)) = rest.split_first_chunk::<FRAME_LEN>() {
        let (len, frame) = frame.split_at(4);
        let (record_generation, crc) = frame.split_at(8);
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let Some((payload, after)) = after.split_at_checked(len) else {
            break;
        };
        if len == 0
            || record_generation != generation.to_le_bytes()
            || crc != checksum(record_generation, payload).to_le_bytes()
        {
            break;
        }
        if payload.first() != Some(&PAD) {
            match Entry::decode(payload) {
                Some(Entry::Group(changes)) => entries.extend(changes),
                Some(entry) => entries.push(entry),
                None => break,
            }
        }
        rest = after;
    }
    entries
}

fn checksum(generation: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(generation);
    hasher.update(payload);
    hasher.finalize()
}

/// For the journal_replay fuzz target (fuzz/): gives `segment` a header of `generation` and,
/// along the chain of record lengths it holds, each record that generation and a matching
/// checksum, so that fuzzing reaches past the checks. Nothing else in it is touched.
#[cfg(fuzzing)]
pub(super) fn seal_for_fuzzing(segment: &mut [u8], generation: u64, live: bool) {
    if let Some(header) = segment.get_mut(..Header::LEN) {
        header.copy_from_slice(&Header { generation, live }.encode());
    }
    let mut at = HEADER_LEN as usize;
    while let Some(&[a, b, c, d]) = segment.get(at..at + 4) {
        let end = at + FRAME_LEN + u32::from_le_bytes([a, b, c, d]) as usize;
        let Some(payload) = segment.get(at + FRAME_LEN..end) else {
            break;
        };
        let crc = checksum(&generation.to_le_bytes(), payload);
        segment[at + 4..at + 12].copy_from_slice(&generation.to_le_bytes());
        segment[at + 12..at + FRAME_LEN].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

struct Header {
    generation: u64,
    /// Whether the records after it may still be needed after a crash.
    live: bool,
}

impl Header {
    const LEN: usize = 8 + 4 + 8 + 1 + 4;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..20].copy_from_slice(&self.generation.to_le_bytes());
        out[20] = u8::from(self.live);
        let crc = crc32fast::hash(&out[..21]);
        out[21..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(segment: &[u8]) -> Option<Header> {
        let bytes = segment.get(..Self::LEN)?;
        let crc = u32::from_le_bytes(bytes[21..].try_into().ok()?);
        if &bytes[..8] != MAGIC
            || bytes[8..12] != VERSION.to_le_bytes()
            || crc != crc32fast::hash(&bytes[..21])
        {
            return None;
        }
        Some(Header {
            generation: u64::from_le_bytes(bytes[12..20].try_into().ok()?),
            live: bytes[20] == 1,
        })
    }

    fn write(&self, segment: &File) -> io::Result<()> {
        segment.write_all_at(&self.encode(), 0)?;
        segment.sync_data()
    }
}

/// Opens a segment, zero-filled to its full size so that writing into it never grows it.
fn open_segment(dir: &Path, index: usize, size: u64) -> io::Result<File> {
    let path = segment_path(dir, index);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    if file.metadata()?.len() != size {
        file.set_len(0)?;
        let zeros = vec![0; 1 << 20];
        let mut at = 0;
        while at < size {
            let n = zeros.len().min((size - at) as usize);
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

impl Journal {
    /// Starts a fresh journal in `dir` after `recovered` has been applied and made durable:
    /// both segments are erased, and counting goes on from the last generation.
    pub fn start(
        dir: &Path,
        segment_bytes: u64,
        recovered: &Recovered,
        files: Arc<dyn Files>,
    ) -> io::Result<Journal> {
        let segment_bytes = segment_bytes.max(HEADER_LEN * 2);
        let generation = recovered.generations.iter().flatten().max().unwrap_or(&0) + 1;
        // Erased (or resized) oldest first: should this stop half-way, what is still live is a
        // newer segment alone, which is safe to apply again; an older one alone is not (a
        // removal it was followed by would be missing).
        let mut order = [0, 1];
        order.sort_by_key(|&index| recovered.generations[index].unwrap_or(0));
        let mut opened: [Option<File>; SEGMENTS] = [None, None];
        for index in order {
            let segment = open_segment(dir, index, segment_bytes)?;
            Header {
                generation,
                live: false,
            }
            .write(&segment)?;
            opened[index] = Some(segment);
        }
        let [Some(first), Some(second)] = opened else {
            return Err(io::Error::other("a journal segment was not opened"));
        };
        let segments = [first, second];
        Header {
            generation,
            live: true,
        }
        .write(&segments[0])?;

        let shared = Arc::new(Shared {
            segments,
            files,
            state: Mutex::new(State {
                clean: [false, true],
                ..State::default()
            }),
            writer: Mutex::new(Writer {
                segment_bytes,
                active: 0,
                generation,
                position: HEADER_LEN,
                touched: HashSet::new(),
                buffer: Vec::new(),
                dirty_until: 0,
                closed: false,
            }),
            to_checkpoint: Condvar::new(),
            to_flush: Condvar::new(),
            progress: Condvar::new(),
            settled: tokio::sync::Notify::new(),
        });
        let checkpointer = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("journal-checkpoint".into())
                .spawn(move || shared.run_checkpoints())?
        };
        let flusher = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("journal-flush".into())
                .spawn(move || shared.run_flushes())?
        };
        Ok(Journal {
            shared,
            capacity: (segment_bytes - HEADER_LEN) as usize,
            checkpointer: Mutex::new(Some(checkpointer)),
            flusher: Mutex::new(Some(flusher)),
        })
    }

    /// Whether `entry` fits in a segment.
    fn accepts(&self, entry: &Entry) -> bool {
        FRAME_LEN + entry.encoded_len() <= self.capacity
    }

    /// The most bytes one `Write` entry for `file` may carry: a longer write is committed in
    /// pieces.
    pub fn max_write(&self, file: &str) -> usize {
        self.capacity - FRAME_LEN - Entry::head_len(file) - 8
    }

    /// What grouping `with` costs a `Write` that [`max_write`](Self::max_write) allows.
    pub fn group_overhead(with: &[Entry]) -> usize {
        Entry::head_len("") + 4 + with.iter().map(|e| 4 + e.encoded_len()).sum::<usize>()
    }

    /// Adds `entry` without waiting for it: it is made durable (and carried out) with the
    /// next commit's batch, or when the journal closes. For changes that a crash may lose,
    /// but must not cost a flush of their own.
    pub fn ride(&self, entry: Entry) {
        if !self.accepts(&entry) {
            tracing::warn!("an entry larger than a journal segment was not kept");
            return;
        }
        let mut state = lock(&self.shared.state);
        if !state.stopping && state.failure.is_none() {
            state.riding.push(entry);
        }
    }

    /// Adds `entry` and waits until it is durable. Fails for good once a write or flush of the
    /// journal has failed (what happened to the disk cannot be known after that), except a
    /// write that met a full disk: that refuses its batch alone (`is_storage_full` says so to
    /// its callers), and the journal goes on.
    ///
    /// Group commit without a thread of its own: a caller that finds no flush under way writes
    /// and flushes everything gathered so far, its own entry and those of the callers waiting;
    /// callers that arrive meanwhile gather for the next flush. Alone, a caller flushes at once.
    pub fn commit(&self, entry: Entry) -> io::Result<()> {
        let shared = &*self.shared;
        let mut state = lock(&shared.state);
        let ticket = self.submit(&mut state, entry)?;
        loop {
            match state.next_step(ticket) {
                Step::Settled(result) => return result,
                Step::Wait => state = wait(&shared.progress, state),
                Step::Lead => {
                    drop(state);
                    shared.flush_round();
                    state = lock(&shared.state);
                }
            }
        }
    }

    /// `commit` for async callers: the wait holds no thread. When no flush is under way the
    /// journal's flusher thread runs one, for everything gathered by then; so thousands of
    /// appends waiting on the disk cost one thread, not one each. (Not the blocking pool: its
    /// threads may all be taken by `commit` callers waiting for that very flush.)
    pub async fn commit_async(&self, entry: Entry) -> io::Result<()> {
        let shared = &self.shared;
        let ticket = self.submit(&mut lock(&shared.state), entry)?;
        loop {
            // Listening before looking: a flush that ends in between still wakes this one.
            let settled = shared.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            let lead = {
                let mut state = lock(&shared.state);
                match state.next_step(ticket) {
                    Step::Settled(result) => return result,
                    Step::Wait => false,
                    Step::Lead => {
                        state.flush_wanted = true;
                        true
                    }
                }
            };
            if lead {
                shared.to_flush.notify_one();
            }
            settled.await;
        }
    }

    /// Hands `entry` in: its ticket says when it is settled (see `State::next_step`).
    fn submit(&self, state: &mut State, entry: Entry) -> io::Result<u64> {
        if !self.accepts(&entry) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an entry larger than a journal segment",
            ));
        }
        if state.stopping {
            return Err(io::Error::other("the store is closed"));
        }
        state.pending.push(entry);
        state.submitted += 1;
        Ok(state.submitted)
    }

    /// A crash, as far as the journal can tell: stops accepting entries and leaves what it
    /// holds for the next start to apply, as if the process had been killed.
    #[cfg(test)]
    pub fn abandon(&self) {
        lock(&self.shared.state).failure = Some("abandoned".into());
    }

    /// Why the journal stopped accepting entries, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.state).failure.clone()
    }
}

impl Journal {
    /// A clean stop: the checkpointer finishes, the conversation files are flushed, and the
    /// journal is erased so that the next start has nothing to apply. Commits fail after it.
    pub fn close(&self) {
        {
            let mut state = lock(&self.shared.state);
            if state.stopping {
                return;
            }
            state.stopping = true;
            // A flush under way finishes first (it may need the checkpointer to switch).
            while state.flushing {
                state = wait(&self.shared.progress, state);
            }
            // Then what rides without a caller, so that a clean stop keeps it.
            let riders = mem::take(&mut state.riding);
            if !riders.is_empty() && state.failure.is_none() {
                drop(state);
                let (_, written) = lock(&self.shared.writer).write(&self.shared, &riders);
                state = lock(&self.shared.state);
                if let Err(e) = written {
                    // What the disk holds is not known: the next start applies the journal.
                    tracing::error!(error = %e, "the store's journal cannot be written");
                    state.failure = Some(format!("the store's journal cannot be written: {e}"));
                }
            }
            state.threads_done = true;
            self.shared.to_checkpoint.notify_all();
            self.shared.to_flush.notify_all();
        }
        for thread in [&self.checkpointer, &self.flusher] {
            if let Some(thread) = lock(thread).take() {
                let _ = thread.join();
            }
        }
        let handed_over = {
            let mut state = lock(&self.shared.state);
            if state.failure.is_some() {
                return; // left as it is, to be applied at the next start
            }
            // A segment filled while the checkpointer was stopping.
            state.checkpoint.take()
        };
        if let Some((segment, touched)) = handed_over
            && let Err(e) = (self.shared.files)
                .flush(&touched)
                .and_then(|()| self.shared.erase(segment))
        {
            tracing::warn!(error = %e, "journal left to be applied at the next start");
            return;
        }
        let mut writer = lock(&self.shared.writer);
        writer.closed = true;
        let erased = self.shared.files.flush(&writer.touched).and_then(|()| {
            Header {
                generation: writer.generation,
                live: false,
            }
            .write(&self.shared.segments[writer.active])
        });
        if let Err(e) = erased {
            tracing::warn!(error = %e, "journal left to be applied at the next start");
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

impl Writer {
    /// Writes a batch at the end of the active segment (going on in the other one when it is
    /// full), flushes it and carries it out. Says how many of its entries (from the first) are
    /// durable and carried out, which is fewer than all only with an error.
    fn write(&mut self, shared: &Shared, batch: &[Entry]) -> (usize, io::Result<()>) {
        if self.closed {
            return (0, Err(io::Error::other("the store is closed")));
        }
        let appends: Vec<&Entry> = batch
            .iter()
            .flat_map(Entry::changes)
            .filter(|change| matches!(change, Entry::Append { .. }))
            .collect();
        if !appends.is_empty()
            && let Err(e) = shared.files.reserve(&appends)
        {
            return (0, Err(e));
        }
        self.buffer.clear();
        self.pad();
        let (mut framed, mut flushed) = (0, 0);
        for entry in batch {
            let len = FRAME_LEN + entry.encoded_len();
            if self.position + (self.buffer.len() + len) as u64 > self.segment_bytes {
                if let Err(e) = self.flush(shared) {
                    return (flushed, Err(e));
                }
                // Carried out before the switch: the checkpoint of this segment comes after.
                if let Err(e) = apply(shared, &batch[flushed..framed]) {
                    return (flushed, Err(e));
                }
                flushed = framed;
                if let Err(e) = self.switch(shared) {
                    return (flushed, Err(e));
                }
            }
            self.frame(entry);
            framed += 1;
            for change in entry.changes() {
                if !self.touched.contains(change.file()) {
                    self.touched.insert(change.file().to_owned());
                }
            }
        }
        if let Err(e) = self.flush(shared) {
            return (flushed, Err(e));
        }
        if let Err(e) = apply(shared, &batch[flushed..framed]) {
            return (flushed, Err(e));
        }
        (framed, Ok(()))
    }

    /// After a refused write, a padding record over what it may have left, first in the
    /// buffer: exactly as long, so that whatever follows starts past it. (Less than a record's
    /// length cannot hold a record, and needs none.)
    fn pad(&mut self) {
        let gap = self.dirty_until.saturating_sub(self.position);
        if gap < MIN_RECORD {
            return;
        }
        self.buffer.extend([0; FRAME_LEN]);
        self.buffer.push(PAD);
        self.buffer
            .resize(usize::try_from(gap).unwrap_or(usize::MAX), 0);
        self.seal(0);
    }

    fn frame(&mut self, entry: &Entry) {
        let start = self.buffer.len();
        self.buffer.extend([0; FRAME_LEN]);
        entry.encode_into(&mut self.buffer);
        self.seal(start);
    }

    /// Fills in the frame of the record that starts at `start` and ends the buffer.
    fn seal(&mut self, start: usize) {
        let generation = self.generation.to_le_bytes();
        let payload = &self.buffer[start + FRAME_LEN..];
        let len = u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes();
        let crc = checksum(&generation, payload).to_le_bytes();
        let frame = &mut self.buffer[start..start + FRAME_LEN];
        frame[..4].copy_from_slice(&len);
        frame[4..12].copy_from_slice(&generation);
        frame[12..].copy_from_slice(&crc);
    }

    /// Writes the buffer at the end of the active segment and flushes it.
    fn flush(&mut self, shared: &Shared) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let segment = &shared.segments[self.active];
        if let Err(e) = segment.write_all_at(&self.buffer, self.position) {
            let end = self.position + self.buffer.len() as u64;
            self.dirty_until = self.dirty_until.max(end);
            return Err(e);
        }
        segment.sync_data().map_err(fatal)?;
        self.position += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Moves on to the other segment once it is clean, and hands the full one to the
    /// checkpointer.
    fn switch(&mut self, shared: &Shared) -> io::Result<()> {
        let next = (self.active + 1) % SEGMENTS;
        {
            let mut state = lock(&shared.state);
            while !state.clean[next] {
                if let Some(failure) = &state.failure {
                    return Err(io::Error::other(failure.clone()));
                }
                state = wait(&shared.progress, state);
            }
        }
        self.generation += 1;
        Header {
            generation: self.generation,
            live: true,
        }
        .write(&shared.segments[next])
        .map_err(fatal)?;
        let full = mem::replace(&mut self.active, next);
        self.position = HEADER_LEN;
        self.dirty_until = 0;
        let touched = mem::take(&mut self.touched);
        let mut state = lock(&shared.state);
        state.clean[next] = false;
        state.checkpoint = Some((full, touched));
        shared.to_checkpoint.notify_one();
        Ok(())
    }
}

/// Carries out durable entries. A failure stops the journal for good (whatever its kind): the
/// entries are durable, so the next start applies them again.
fn apply(shared: &Shared, entries: &[Entry]) -> io::Result<()> {
    for change in entries.iter().flat_map(Entry::changes) {
        shared.files.apply(change).map_err(|e| {
            fatal(io::Error::new(
                e.kind(),
                format!(
                    "cannot carry out a journaled change to {}: {e}",
                    change.file()
                ),
            ))
        })?;
    }
    Ok(())
}

impl Shared {
    /// One flush, by the caller `State::next_step` chose: writes, flushes and carries out
    /// everything gathered so far, then wakes every waiting caller (one of them leads the next
    /// flush if entries came in meanwhile).
    fn flush_round(&self) {
        let mut state = lock(&self.state);
        // Riders go first: they came before (a rider is never counted as a caller).
        let riders = mem::take(&mut state.riding);
        let mut batch = mem::take(&mut state.pending);
        let first = state.submitted - batch.len() as u64;
        let riding = riders.len();
        batch.splice(0..0, riders);
        drop(state);
        let (flushed, written) = lock(&self.writer).write(self, &batch);
        batch.drain(..riding);
        let flushed = flushed.saturating_sub(riding);
        let mut state = lock(&self.state);
        state.flushing = false;
        state.durable = first + flushed as u64;
        match written {
            Ok(()) => {}
            Err(e) if is_storage_full(&e) => {
                // This batch is refused (its callers cut their files back); the next goes on.
                tracing::warn!(error = %e, "the disk is full: appends refused");
                let (after, through) = (state.durable, first + batch.len() as u64);
                state.refused.push(Refusal {
                    after,
                    through,
                    waiting: through - after,
                    kind: e.kind(),
                    message: format!("the disk is full: {e}"),
                });
                state.durable = through;
            }
            Err(e) => {
                tracing::error!(error = %e, "the store's journal cannot be written");
                state.failure = Some(format!("the store's journal cannot be written: {e}"));
            }
        }
        drop(state);
        self.progress.notify_all();
        self.settled.notify_waiters();
    }

    /// Until the journal stops: the flushes async callers ask for (`Journal::commit_async`).
    fn run_flushes(&self) {
        loop {
            {
                let mut state = lock(&self.state);
                while !state.flush_wanted {
                    if state.threads_done {
                        return;
                    }
                    state = wait(&self.to_flush, state);
                }
                state.flush_wanted = false;
            }
            self.flush_round();
        }
    }

    /// Until the journal stops: flushes the files a full segment touched, then erases it.
    fn run_checkpoints(&self) {
        loop {
            let (segment, touched) = {
                let mut state = lock(&self.state);
                while state.checkpoint.is_none() && !state.threads_done {
                    state = wait(&self.to_checkpoint, state);
                }
                match state.checkpoint.take() {
                    Some(job) => job,
                    None => return,
                }
            };
            let done = self
                .files
                .flush(&touched)
                .and_then(|()| self.erase(segment));
            let mut state = lock(&self.state);
            match done {
                Ok(()) => state.clean[segment] = true,
                Err(e) => {
                    tracing::error!(error = %e, "the store's checkpoint failed");
                    state.failure = Some(format!("the store's checkpoint failed: {e}"));
                }
            }
            self.progress.notify_all();
        }
    }

    /// Marks a checkpointed segment as holding nothing to apply, keeping its generation.
    fn erase(&self, segment: usize) -> io::Result<()> {
        let file = &self.segments[segment];
        let mut header = [0; Header::LEN];
        file.read_exact_at(&mut header, 0)?;
        let generation = Header::decode(&header)
            .map(|h| h.generation)
            .ok_or_else(|| io::Error::other("a journal segment's header is damaged"))?;
        Header {
            generation,
            live: false,
        }
        .write(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(file: &str, offset: u64, text: &str) -> Entry {
        Entry::Write {
            file: file.to_owned(),
            offset,
            bytes: text.as_bytes().to_vec(),
        }
    }

    /// Files that the journal's own tests only watch: what is carried out, and each
    /// checkpoint's flush (by `flush`).
    struct Watched<F> {
        flush: F,
        applied: Mutex<Vec<Entry>>,
    }

    impl<F: Fn(&HashSet<String>) -> io::Result<()> + Send + Sync + 'static> Files for Watched<F> {
        fn reserve(&self, _: &[&Entry]) -> io::Result<()> {
            Ok(())
        }

        fn apply(&self, change: &Entry) -> io::Result<()> {
            self.applied.lock().unwrap().push(change.clone());
            Ok(())
        }

        fn flush(&self, files: &HashSet<String>) -> io::Result<()> {
            (self.flush)(files)
        }
    }

    fn files(
        flush: impl Fn(&HashSet<String>) -> io::Result<()> + Send + Sync + 'static,
    ) -> Arc<dyn Files> {
        Arc::new(Watched {
            flush,
            applied: Mutex::new(Vec::new()),
        })
    }

    type Checkpoint = fn(&HashSet<String>) -> io::Result<()>;

    /// Files whose checkpoints always succeed, watched for what is carried out.
    fn watched() -> Arc<Watched<Checkpoint>> {
        Arc::new(Watched {
            flush: |_| Ok(()),
            applied: Mutex::new(Vec::new()),
        })
    }

    fn no_files() -> Arc<dyn Files> {
        watched()
    }

    /// A journal in `dir`, after applying (here: ignoring) what an earlier run left.
    fn start(dir: &Path, segment_bytes: u64, files: Arc<dyn Files>) -> Journal {
        Journal::start(dir, segment_bytes, &recover(dir).unwrap(), files).unwrap()
    }

    fn crash(journal: Journal) {
        journal.abandon();
        drop(journal);
    }

    #[test]
    fn entries_round_trip_through_their_encoding() {
        for entry in [
            write("conv_a", 0, "{\"x\":1}\n"),
            write("conv_b", 1 << 40, ""),
            Entry::Delete {
                file: "conv_c".into(),
            },
            Entry::Append {
                file: "~ledger".into(),
                bytes: b"{}\n".to_vec(),
            },
            Entry::Group(vec![
                write("conv_d", 7, "reply\n"),
                Entry::Append {
                    file: "~ledger".into(),
                    bytes: b"{\"cost\":1}\n".to_vec(),
                },
            ]),
        ] {
            let mut out = Vec::new();
            entry.encode_into(&mut out);
            assert_eq!(out.len(), entry.encoded_len());
            assert_eq!(Entry::decode(&out), Some(entry));
        }
        assert_eq!(Entry::decode(&[WRITE, 200, b'x']), None);
        assert_eq!(Entry::decode(&[9, 1, b'x']), None);
        // A group inside a group, or a group with a name, is not one.
        let mut nested = Vec::new();
        Entry::Group(vec![Entry::Group(vec![])]).encode_into(&mut nested);
        assert_eq!(Entry::decode(&nested), None);
        assert_eq!(Entry::decode(&[GROUP, 1, b'x']), None);
    }

    #[test]
    fn after_a_crash_every_committed_entry_comes_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let journal = start(dir.path(), 1 << 16, no_files());
        let mut expected = Vec::new();
        for i in 0..50 {
            let entry = write(&format!("conv_{}", i % 3), i * 10, "0123456789");
            journal.commit(entry.clone()).unwrap();
            expected.push(entry);
        }
        crash(journal);
        assert_eq!(recover(dir.path()).unwrap().entries, expected);
    }

    #[test]
    fn changes_are_carried_out_once_durable_in_order_and_a_group_whole_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let watched = watched();
        let journal = start(dir.path(), 1 << 16, watched.clone());
        let reply = write("conv_a", 0, "reply\n");
        let priced = Entry::Append {
            file: "~ledger".into(),
            bytes: b"{\"cost_usd\":0.5}\n".to_vec(),
        };
        journal.commit(write("conv_a", 0, "hi\n")).unwrap();
        journal
            .commit(Entry::Group(vec![reply.clone(), priced.clone()]))
            .unwrap();
        assert_eq!(
            *watched.applied.lock().unwrap(),
            [write("conv_a", 0, "hi\n"), reply.clone(), priced.clone()]
        );
        crash(journal);
        assert_eq!(
            recover(dir.path()).unwrap().entries,
            [write("conv_a", 0, "hi\n"), reply, priced]
        );
    }

    #[test]
    fn a_rider_is_written_with_the_next_commit_or_at_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let watched = watched();
        let journal = start(dir.path(), 1 << 16, watched.clone());
        let record = |n: &str| Entry::Replace {
            file: "~idempotency/k".into(),
            bytes: n.as_bytes().to_vec(),
        };
        journal.ride(record("1"));
        assert!(
            watched.applied.lock().unwrap().is_empty(),
            "nobody flushed yet"
        );
        journal.commit(write("conv_a", 0, "hi\n")).unwrap();
        assert_eq!(
            *watched.applied.lock().unwrap(),
            [record("1"), write("conv_a", 0, "hi\n")]
        );
        journal.ride(record("2"));
        journal.close();
        assert_eq!(watched.applied.lock().unwrap().last(), Some(&record("2")));
    }

    #[test]
    fn a_clean_stop_leaves_nothing_to_apply_and_flushes_what_was_touched() {
        let dir = tempfile::tempdir().unwrap();
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&flushed);
        let flush = files(move |touched: &HashSet<String>| {
            seen.lock().unwrap().extend(touched.iter().cloned());
            Ok(())
        });
        let journal = start(dir.path(), 1 << 16, flush);
        journal.commit(write("conv_a", 0, "line\n")).unwrap();
        drop(journal);
        assert_eq!(*flushed.lock().unwrap(), ["conv_a"]);
        let recovered = recover(dir.path()).unwrap();
        assert!(recovered.entries.is_empty());

        // What the old run left further on in the segments is not read as new.
        let journal = Journal::start(dir.path(), 1 << 16, &recovered, no_files()).unwrap();
        journal.commit(write("conv_b", 0, "new\n")).unwrap();
        crash(journal);
        assert_eq!(
            recover(dir.path()).unwrap().entries,
            [write("conv_b", 0, "new\n")]
        );
    }

    #[test]
    fn full_segments_are_checkpointed_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = Arc::new(Mutex::new(0));
        let counted = Arc::clone(&checkpoints);
        let flush = files(move |_: &HashSet<String>| {
            *counted.lock().unwrap() += 1;
            Ok(())
        });
        let segment = HEADER_LEN * 2;
        let journal = start(dir.path(), segment, flush);
        let line = "x".repeat(500);
        let mut committed = Vec::new();
        for i in 0..100 {
            let entry = write("conv_a", i * 500, &line);
            journal.commit(entry.clone()).unwrap();
            committed.push(entry);
        }
        assert!(*checkpoints.lock().unwrap() >= 10, "segments went round");
        crash(journal);
        // What is left is a tail of what was committed, in order, up to the last entry.
        let left = recover(dir.path()).unwrap().entries;
        assert!(!left.is_empty());
        assert!(committed.ends_with(&left), "{} entries left", left.len());
        let size = std::fs::metadata(dir.path().join("segment-0"))
            .unwrap()
            .len();
        assert_eq!(size, segment, "segments never grow");
    }

    #[test]
    fn a_torn_or_damaged_record_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let journal = start(dir.path(), 1 << 16, no_files());
        for i in 0..3 {
            journal.commit(write("conv_a", i, "abc")).unwrap();
        }
        crash(journal);
        // Damage the second record's payload.
        let path = dir.path().join("segment-0");
        let mut bytes = std::fs::read(&path).unwrap();
        let second = HEADER_LEN as usize + FRAME_LEN + write("conv_a", 0, "abc").encoded_len();
        bytes[second + FRAME_LEN + 3] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(
            recover(dir.path()).unwrap().entries,
            [write("conv_a", 0, "abc")]
        );
    }

    #[test]
    fn an_entry_larger_than_a_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let journal = start(dir.path(), 1 << 16, no_files());
        let most = journal.max_write("conv_a");
        journal
            .commit(write("conv_a", 0, &"x".repeat(most)))
            .unwrap();
        let refused = journal.commit(write("conv_a", 0, &"x".repeat(most + 1)));
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_failed_checkpoint_stops_the_journal_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let flush = files(|_: &HashSet<String>| Err(io::Error::other("disk gone")));
        let journal = start(dir.path(), HEADER_LEN * 2, flush);
        let line = "x".repeat(1000);
        let failed = (0..20).find_map(|i| journal.commit(write("conv_a", i, &line)).err());
        let failure = failed
            .expect("commits fail once the checkpoint failed")
            .to_string();
        assert!(failure.contains("disk gone"), "{failure}");
        assert!(journal.failure().is_some());
        assert!(journal.commit(write("conv_a", 0, "y")).is_err());
    }

    #[test]
    fn closing_while_appends_go_on_finishes_and_leaves_nothing_to_apply() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(start(dir.path(), HEADER_LEN * 2, no_files()));
        let appenders: Vec<_> = (0..4)
            .map(|a| {
                let journal = Arc::clone(&journal);
                thread::spawn(move || {
                    let line = "x".repeat(300);
                    (0..)
                        .take_while(|i| {
                            journal
                                .commit(write("conv_a", a * 1_000_000 + i, &line))
                                .is_ok()
                        })
                        .count()
                })
            })
            .collect();
        thread::sleep(std::time::Duration::from_millis(50));
        let (closed, done) = std::sync::mpsc::channel();
        let closer = Arc::clone(&journal);
        thread::spawn(move || {
            closer.close();
            let _ = closed.send(());
        });
        done.recv_timeout(std::time::Duration::from_secs(10))
            .expect("close finishes while appends go on");
        let committed: usize = appenders.into_iter().map(|a| a.join().unwrap()).sum();
        assert!(committed > 0);
        assert!(journal.commit(write("conv_a", 0, "late")).is_err());
        assert!(recover(dir.path()).unwrap().entries.is_empty());
    }

    /// A small tmpfs, unmounted when dropped: a disk that really fills up. Mounting needs
    /// root, which CI has: a failure to mount fails the test, it is not skipped.
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        fn mount() -> SmallDisk {
            let dir = tempfile::tempdir().unwrap();
            let output = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
                .arg(dir.path())
                .output()
                .expect("cannot run `mount`");
            assert!(
                output.status.success(),
                "this test mounts a small tmpfs and needs root to do so (CI runs as root): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            SmallDisk(dir)
        }

        fn path(&self) -> &Path {
            self.0.path()
        }

        /// Takes every free block; returns the file that holds them.
        fn fill(&self) -> PathBuf {
            use std::io::Write;
            let path = self.path().join("filler");
            let mut file = File::create(&path).unwrap();
            let chunk = vec![0; 64 << 10];
            loop {
                match file.write(&chunk) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if is_storage_full(&e) => break,
                    Err(e) => panic!("filling the disk: {e}"),
                }
            }
            path
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    /// Segments of the right size without blocks (as on a copy-on-write filesystem, writing a
    /// record needs new ones), then the journal over them.
    fn start_sparse(dir: &Path, segment_bytes: u64) -> Journal {
        for index in 0..SEGMENTS {
            File::create(segment_path(dir, index))
                .unwrap()
                .set_len(segment_bytes)
                .unwrap();
        }
        start(dir, segment_bytes, no_files())
    }

    #[test]
    fn a_full_disk_refuses_the_append_and_the_journal_goes_on_once_there_is_room() {
        let disk = SmallDisk::mount();
        let journal = start_sparse(disk.path(), HEADER_LEN * 8);
        let first = write("conv_a", 0, "first\n");
        journal.commit(first.clone()).unwrap();

        let filler = disk.fill();
        let line = "x".repeat(6000); // needs a block the disk no longer has
        let refused = journal.commit(write("conv_a", 6, &line)).unwrap_err();
        assert!(is_storage_full(&refused), "{refused}");
        assert!(refused.to_string().contains("disk is full"), "{refused}");
        assert_eq!(
            journal.failure(),
            None,
            "a full disk does not stop the journal"
        );

        std::fs::remove_file(filler).unwrap();
        let next = write("conv_a", 6, &line);
        journal.commit(next.clone()).unwrap();
        crash(journal);
        assert_eq!(recover(disk.path()).unwrap().entries, [first, next]);
    }

    #[test]
    fn whole_records_a_refused_write_left_behind_are_never_read_once_writing_goes_on() {
        let disk = SmallDisk::mount();
        let journal = start_sparse(disk.path(), HEADER_LEN * 8);
        let first = write("conv_a", 0, "first\n");
        journal.commit(first.clone()).unwrap();

        // One batch of three: the first two fit in the block the first record already holds,
        // the third needs a new one. The disk takes the first two whole, then is full.
        let filler = disk.fill();
        let (a, b, c) = (
            write("conv_a", 6, &"a".repeat(500)),
            write("conv_b", 0, &"b".repeat(500)),
            write("conv_c", 0, &"c".repeat(5000)),
        );
        let (durable, written) =
            lock(&journal.shared.writer).write(&journal.shared, &[a.clone(), b.clone(), c]);
        assert_eq!(durable, 0);
        assert!(written.as_ref().is_err_and(is_storage_full), "{written:?}");
        // What a crash right now would find: refused, complete entries (as with a crash
        // between a write and its acknowledgement); never a part of one.
        assert_eq!(
            recover(disk.path()).unwrap().entries,
            [first.clone(), a, b.clone()]
        );

        // The next write is as long as `a`, so that `b` would follow it as a valid record if
        // the refused bytes were not covered first.
        std::fs::remove_file(filler).unwrap();
        let next = write("conv_a", 6, &"n".repeat(500));
        journal.commit(next.clone()).unwrap();
        crash(journal);
        assert_eq!(recover(disk.path()).unwrap().entries, [first, next]);
    }
}
