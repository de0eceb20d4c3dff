//! The local store's fuzz targets (fuzz/, built with `--cfg fuzzing`): whatever bytes a crash,
//! a failing disk or a hand edit may leave in the data folder, read the way the store reads
//! them when it opens. Reading may refuse them with an error; it must not panic, hang, or
//! allocate beyond what the bytes themselves hold.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::file::{apply_for_fuzzing, load_for_fuzzing};
use super::journal::{self, seal_for_fuzzing};

/// The one conversation the conversation_file target writes.
const CONVERSATION: &str = "conv_fuzz";

/// A folder of this process's own, emptied for each input: under `TMPDIR`, which `.ci/fuzz`
/// points at a memory file system (the store's fsyncs then cost nothing) and removes after.
fn scratch(name: &str) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT
        .get_or_init(|| std::env::temp_dir().join(format!("maestra-fuzz-{}", std::process::id())));
    let dir = root.join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("cannot create the fuzzing folder");
    dir
}

/// `data`, its first byte aside (how many recent messages to keep, 1 to 16), as a
/// conversation file: loaded as the store opens it, then read as history and sync read it.
pub fn conversation_file(data: &[u8]) {
    let Some((&keep, bytes)) = data.split_first() else {
        return;
    };
    let keep = usize::from(keep % 16) + 1;
    let path = scratch("conversations").join(format!("{CONVERSATION}.json"));
    fs::write(&path, bytes).expect("cannot write the fuzzing input");
    // Loading repairs what a crash left (a torn last line cut, a file torn at its creation
    // removed): loading again finds the file as the first load left it.
    if let Ok(first) = load_for_fuzzing(&path, keep) {
        let again = load_for_fuzzing(&path, keep).expect("a file loaded once loads again");
        assert_eq!(
            first, again,
            "a conversation file reads differently when loaded again"
        );
    }
}

/// `data` as the journal's two segments, recovered and applied to an empty conversations
/// folder, whose files are then loaded: what the store does when it opens after a crash.
///
/// `data`: a flags byte, a 16-bit length (segment 0's; segment 1 is the rest), the segments.
/// Flags, for segment `i`: bit `i` seals it (a header, then the bytes as records, their
/// generations and checksums made right: see `seal_for_fuzzing`), else it is the bytes as they
/// are; bit `2 + i` says live; bits `4 + 2i`, `5 + 2i` its generation.
pub fn journal_replay(data: &[u8]) {
    let Some((&[flags, low, high], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let (first, second) =
        rest.split_at(usize::from(u16::from_le_bytes([low, high])).min(rest.len()));
    let root = scratch("replay");
    let (journal_dir, conversations) = (root.join("journal"), root.join("conversations"));
    for dir in [&journal_dir, &conversations] {
        fs::create_dir(dir).expect("cannot create the fuzzing folders");
    }
    for (index, bytes) in [first, second].into_iter().enumerate() {
        let segment = if flags >> index & 1 == 1 {
            let mut segment = vec![0; 4096];
            segment.extend_from_slice(bytes);
            let generation = u64::from(flags >> (4 + 2 * index) & 3);
            seal_for_fuzzing(&mut segment, generation, flags >> (2 + index) & 1 == 1);
            segment
        } else {
            bytes.to_vec()
        };
        // The segments' names: journal::segment_path.
        fs::write(journal_dir.join(format!("segment-{index}")), segment)
            .expect("cannot write the fuzzing input");
    }
    let recovered = journal::recover(&journal_dir).expect("the segments written can be read");
    if apply_for_fuzzing(&conversations, &recovered.entries).is_err() {
        return; // refused: the store does not open
    }
    for file in fs::read_dir(&conversations).expect("the folder just made can be read") {
        let path = file.expect("an entry of the folder").path();
        let _ = load_conversation(&path);
    }
}

fn load_conversation(path: &Path) -> Option<u64> {
    load_for_fuzzing(path, 4).ok().flatten()
}
