//! The model provider's event stream, in any network chunking (maestra::fuzzing::provider_sse).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| maestra::fuzzing::provider_sse(data));
