//! Group commit for the local store: one write-ahead journal makes many appends durable with one
//! flush.
//!
//! A conversation's file takes its new line at once (into the page cache); the same bytes go to
//! the journal, and the append waits until the journal has flushed them. One flush at a time
//! writes everything gathered since the last one, so concurrent appends to different
//! conversations share a single `fdatasync` and flushes never queue in the device. The journal
//! is two zero-filled segments overwritten in place: a flush writes data only, never a file size
//! or a block map.
//!
//! When the active segment is full the journal moves on to the other one, and a checkpointer
//! thread flushes the conversation files the full segment touched; then that segment is erased
//! and may be reused. After a crash, [`recover`] returns the entries of the live segments,
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
/// The smallest record: a frame, a kind and an id length.
const MIN_RECORD: u64 = FRAME_LEN as u64 + 2;

/// One change to a conversation file, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `bytes` stand in the conversation's file at `offset` (0 creates the file).
    Write {
        conversation: String,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// The conversation's file is removed.
    Delete { conversation: String },
    /// The conversation's file holds `bytes` and nothing else: rewritten in one entry, so that
    /// a crash leaves either the old file or the new one.
    Replace {
        conversation: String,
        bytes: Vec<u8>,
    },
}

impl Entry {
    pub fn conversation(&self) -> &str {
        match self {
            Entry::Write { conversation, .. }
            | Entry::Delete { conversation }
            | Entry::Replace { conversation, .. } => conversation,
        }
    }

    /// Kind, id length, id: what every entry starts with.
    fn head_len(conversation: &str) -> usize {
        2 + conversation.len()
    }

    fn encoded_len(&self) -> usize {
        let head = Self::head_len(self.conversation());
        match self {
            Entry::Write { bytes, .. } => head + 8 + bytes.len(),
            Entry::Delete { .. } => head,
            Entry::Replace { bytes, .. } => head + bytes.len(),
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let id = self.conversation().as_bytes();
        // Conversation ids are at most 128 bytes (domain::ConversationId).
        let id_len = u8::try_from(id.len()).unwrap_or(u8::MAX);
        match self {
            Entry::Write { offset, bytes, .. } => {
                out.extend([WRITE, id_len]);
                out.extend(&id[..usize::from(id_len)]);
                out.extend(offset.to_le_bytes());
                out.extend(bytes);
            }
            Entry::Delete { .. } => {
                out.extend([DELETE, id_len]);
                out.extend(&id[..usize::from(id_len)]);
            }
            Entry::Replace { bytes, .. } => {
                out.extend([REPLACE, id_len]);
                out.extend(&id[..usize::from(id_len)]);
                out.extend(bytes);
            }
        }
    }

    fn decode(payload: &[u8]) -> Option<Entry> {
        let (&kind, rest) = payload.split_first()?;
        let (&id_len, rest) = rest.split_first()?;
        let (id, rest) = rest.split_at_checked(usize::from(id_len))?;
        let conversation = String::from_utf8(id.to_vec()).ok()?;
        match kind {
            WRITE => {
                let (offset, bytes) = rest.split_first_chunk::<8>()?;
                Some(Entry::Write {
                    conversation,
                    offset: u64::from_le_bytes(*offset),
                    bytes: bytes.to_vec(),
                })
            }
            DELETE if rest.is_empty() => Some(Entry::Delete { conversation }),
            REPLACE => Some(Entry::Replace {
                conversation,
                bytes: rest.to_vec(),
            }),
            _ => None,
        }
    }
}

/// Makes the conversation files named durable (the checkpoint of a full segment).
pub type FlushFiles = dyn Fn(&HashSet<String>) -> io::Result<()> + Send + Sync;

pub struct Journal {
    shared: Arc<Shared>,
    capacity: usize,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    segments: [File; SEGMENTS],
    flush_files: Arc<FlushFiles>,
    state: Mutex<State>,
    /// Held by the one caller that writes and flushes for everybody (see `Journal::commit`).
    writer: Mutex<Writer>,
    /// The checkpointer waits here for a full segment.
    to_checkpoint: Condvar,
    /// Callers wait here for their flush, the writer for a clean segment.
    progress: Condvar,
}

#[derive(Default)]
struct State {
    pending: Vec<Entry>,
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
    /// Set by `close` once no flush is under way: the checkpointer may exit.
    checkpointer_done: bool,
    /// A full segment waiting to be checkpointed, with the conversations it touched.
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
    /// Conversations the active segment has touched.
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
    /// The live segments' entries, oldest first: to be applied again.
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
        flush_files: Arc<FlushFiles>,
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
            flush_files,
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
            progress: Condvar::new(),
        });
        let checkpointer = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("journal-checkpoint".into())
                .spawn(move || shared.run_checkpoints())?
        };
        Ok(Journal {
            shared,
            capacity: (segment_bytes - HEADER_LEN) as usize,
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    /// Whether `entry` fits in a segment.
    fn accepts(&self, entry: &Entry) -> bool {
        FRAME_LEN + entry.encoded_len() <= self.capacity
    }

    /// The most bytes one `Write` entry for `conversation` may carry: a longer write is
    /// committed in pieces.
    pub fn max_write(&self, conversation: &str) -> usize {
        self.capacity - FRAME_LEN - Entry::head_len(conversation) - 8
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
        if !self.accepts(&entry) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an entry larger than a journal segment",
            ));
        }
        let shared = &*self.shared;
        let mut state = lock(&shared.state);
        if state.stopping {
            return Err(io::Error::other("the store is closed"));
        }
        state.pending.push(entry);
        state.submitted += 1;
        let ticket = state.submitted;
        loop {
            // Settled first: an entry flushed before a failure was still made durable.
            if state.durable >= ticket {
                return state.refusal(ticket).map_or(Ok(()), Err);
            }
            if let Some(failure) = &state.failure {
                return Err(io::Error::other(failure.clone()));
            }
            if state.flushing {
                state = wait(&shared.progress, state);
                continue;
            }
            if state.stopping {
                return Err(io::Error::other("the store is closed"));
            }
            state.flushing = true;
            let batch = mem::take(&mut state.pending);
            let first = state.submitted - batch.len() as u64;
            drop(state);
            let (flushed, written) = lock(&shared.writer).write(shared, &batch);
            state = lock(&shared.state);
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
            shared.progress.notify_all();
        }
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
            state.checkpointer_done = true;
            self.shared.to_checkpoint.notify_all();
        }
        if let Some(checkpointer) = lock(&self.checkpointer).take() {
            let _ = checkpointer.join();
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
            && let Err(e) =
                (self.shared.flush_files)(&touched).and_then(|()| self.shared.erase(segment))
        {
            tracing::warn!(error = %e, "journal left to be applied at the next start");
            return;
        }
        let mut writer = lock(&self.shared.writer);
        writer.closed = true;
        let erased = (self.shared.flush_files)(&writer.touched).and_then(|()| {
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
    /// full) and flushes it. Says how many of its entries (from the first) are durable, which
    /// is fewer than all only with an error.
    fn write(&mut self, shared: &Shared, batch: &[Entry]) -> (usize, io::Result<()>) {
        if self.closed {
            return (0, Err(io::Error::other("the store is closed")));
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
                flushed = framed;
                if let Err(e) = self.switch(shared) {
                    return (flushed, Err(e));
                }
            }
            self.frame(entry);
            framed += 1;
            if !self.touched.contains(entry.conversation()) {
                self.touched.insert(entry.conversation().to_owned());
            }
        }
        match self.flush(shared) {
            Ok(()) => (framed, Ok(())),
            Err(e) => (flushed, Err(e)),
        }
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

impl Shared {
    /// Until the journal stops: flushes the files a full segment touched, then erases it.
    fn run_checkpoints(&self) {
        loop {
            let (segment, touched) = {
                let mut state = lock(&self.state);
                while state.checkpoint.is_none() && !state.checkpointer_done {
                    state = wait(&self.to_checkpoint, state);
                }
                match state.checkpoint.take() {
                    Some(job) => job,
                    None => return,
                }
            };
            let done = (self.flush_files)(&touched).and_then(|()| self.erase(segment));
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

    fn write(conversation: &str, offset: u64, text: &str) -> Entry {
        Entry::Write {
            conversation: conversation.to_owned(),
            offset,
            bytes: text.as_bytes().to_vec(),
        }
    }

    fn no_files() -> Arc<FlushFiles> {
        Arc::new(|_: &HashSet<String>| Ok(()))
    }

    /// A journal in `dir`, after applying (here: ignoring) what an earlier run left.
    fn start(dir: &Path, segment_bytes: u64, flush_files: Arc<FlushFiles>) -> Journal {
        Journal::start(dir, segment_bytes, &recover(dir).unwrap(), flush_files).unwrap()
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
                conversation: "conv_c".into(),
            },
        ] {
            let mut out = Vec::new();
            entry.encode_into(&mut out);
            assert_eq!(out.len(), entry.encoded_len());
            assert_eq!(Entry::decode(&out), Some(entry));
        }
        assert_eq!(Entry::decode(&[WRITE, 200, b'x']), None);
        assert_eq!(Entry::decode(&[9, 1, b'x']), None);
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
    fn a_clean_stop_leaves_nothing_to_apply_and_flushes_what_was_touched() {
        let dir = tempfile::tempdir().unwrap();
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&flushed);
        let flush: Arc<FlushFiles> = Arc::new(move |touched: &HashSet<String>| {
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
        let flush: Arc<FlushFiles> = Arc::new(move |_: &HashSet<String>| {
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
        let flush: Arc<FlushFiles> =
            Arc::new(|_: &HashSet<String>| Err(io::Error::other("disk gone")));
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
