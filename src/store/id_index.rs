//! Which seq holds a message id, for an open conversation: 16 bytes a message instead of a
//! copy of every id (about 88 bytes a message, most of a long conversation's memory).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;

/// Keyed anew in each process, so that ids cannot be chosen to share a fingerprint.
static KEY: LazyLock<RandomState> = LazyLock::new(RandomState::new);

/// Every stored id's fingerprint, with the seq of each message stored under it.
///
/// Two ids may share a fingerprint (about once in 2^64 pairs), so a seq found here is a
/// candidate the caller checks against the message itself; a fingerprint missing here proves
/// its id was never stored.
#[derive(Default)]
pub(super) struct IdIndex {
    seqs: HashMap<u64, i64>,
    /// The seqs of later messages whose fingerprint an earlier one had: almost always empty.
    shared: Vec<(u64, i64)>,
}

impl IdIndex {
    /// The seqs that may hold `id`: none if no message has it.
    pub(super) fn candidates(&self, id: &str) -> impl Iterator<Item = i64> + '_ {
        self.seqs_of(fingerprint(id))
    }

    /// Whether a message with `id`'s fingerprint is stored at `seq`.
    pub(super) fn holds(&self, id: &str, seq: i64) -> bool {
        self.candidates(id).any(|candidate| candidate == seq)
    }

    pub(super) fn insert(&mut self, id: &str, seq: i64) {
        let print = fingerprint(id);
        if self.seqs_of(print).any(|stored| stored == seq) {
            return;
        }
        match self.seqs.entry(print) {
            Entry::Vacant(vacant) => {
                vacant.insert(seq);
            }
            Entry::Occupied(_) => self.shared.push((print, seq)),
        }
    }

    fn seqs_of(&self, print: u64) -> impl Iterator<Item = i64> + '_ {
        let shared = self.shared.iter().filter(move |(p, _)| *p == print);
        self.seqs
            .get(&print)
            .copied()
            .into_iter()
            .chain(shared.map(|&(_, seq)| seq))
    }
}

#[cfg(not(test))]
fn fingerprint(id: &str) -> u64 {
    KEY.hash_one(id)
}

#[cfg(test)]
fn fingerprint(id: &str) -> u64 {
    if collisions::ON.load(std::sync::atomic::Ordering::Relaxed) {
        return 0;
    }
    KEY.hash_one(id)
}

/// Tests can make every id share one fingerprint, to walk the path a real collision takes.
/// Other tests using the store meanwhile take it too, and pass all the same: it is exact.
#[cfg(test)]
pub(super) mod collisions {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, MutexGuard, PoisonError};

    pub(super) static ON: AtomicBool = AtomicBool::new(false);
    static HELD: Mutex<()> = Mutex::new(());

    /// While this lives, every id collides (and tests of the index itself wait).
    pub struct Everywhere {
        _held: MutexGuard<'static, ()>,
    }

    pub fn everywhere() -> Everywhere {
        let held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        ON.store(true, Ordering::Relaxed);
        Everywhere { _held: held }
    }

    pub fn nowhere() -> MutexGuard<'static, ()> {
        HELD.lock().unwrap_or_else(PoisonError::into_inner)
    }

    impl Drop for Everywhere {
        fn drop(&mut self) {
            ON.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_never_stored_has_no_candidate_and_ids_sharing_a_fingerprint_keep_every_seq() {
        let real = collisions::nowhere();
        let mut index = IdIndex::default();
        assert_eq!(index.candidates("msg_a").count(), 0);
        index.insert("msg_a", 1);
        index.insert("msg_b", 2);
        assert_eq!(index.candidates("msg_a").collect::<Vec<_>>(), [1]);
        assert!(index.holds("msg_b", 2) && !index.holds("msg_b", 1));
        assert_eq!(index.candidates("msg_c").count(), 0);
        drop(real);

        let _all = collisions::everywhere();
        let mut index = IdIndex::default();
        for (seq, id) in ["msg_a", "msg_b", "msg_c"].into_iter().enumerate() {
            index.insert(id, seq as i64 + 1);
        }
        index.insert("msg_b", 2);
        assert_eq!(index.candidates("msg_z").collect::<Vec<_>>(), [1, 2, 3]);
    }
}
