//! The journal's two segments, recovered and replayed into the conversation files, which are then
//! loaded: the store's start after a crash (maestra::fuzzing::journal_replay).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| maestra::fuzzing::journal_replay(data));
