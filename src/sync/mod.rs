//! Sync: local installs and the cloud as one conversation space.
//!
//! Every message keeps one id wherever it is stored, and every store can tell what it holds by
//! that id, so sync only ever copies messages a side does not have yet:
//!
//! - **push** (install → cloud): each install sends the messages written on it and the
//!   conversations deleted on it; it remembers, per conversation file, how far it has sent.
//! - **pull** (cloud → install): every change to a user's conversations in the cloud (a
//!   message stored, whoever wrote it; a conversation deleted) takes the next number of that
//!   user's feed; an install remembers, per user, how far it has read.
//!
//! Order: a message is stamped by a clock kept per conversation (after every message its
//! server had of the conversation), and every server lists a conversation by `(created_at,
//! id)`, so both sides show the same order once synced. A conversation written on both sides
//! while they were apart interleaves by those stamps. The same message id with two different
//! contents (a turn answered on both sides under one `Idempotency-Key` while they were apart)
//! ends as the cloud's copy on both.
//!
//! Deletions erase every message of the conversation stamped up to the deletion, on both
//! sides, and are remembered for good, so an old copy synced later never brings them back; a
//! message stamped after it (the id used again) starts the conversation anew.
//!
//! Costs are counted once, where the reply was made: a synced reply keeps its model and usage
//! but adds nothing to the receiving side's ledger or usage table.

pub mod cloud;
pub mod link;
pub mod local;
pub mod protocol;

pub use cloud::CloudSync;
pub use link::CloudLink;
pub use local::{LocalSync, SyncState, SyncStatus};

/// Which side of sync a server is.
#[derive(Clone)]
pub enum SyncSide {
    /// The cloud: takes pushes and answers pulls.
    Cloud(CloudSync),
    /// A local server: syncs with the cloud it is linked to.
    Local(LocalSync),
}
