//! A conversation file (JSON Lines under the data folder), loaded and read back as the store does
//! (maestra::fuzzing::conversation_file).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| maestra::fuzzing::conversation_file(data));
