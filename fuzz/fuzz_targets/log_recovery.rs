#![no_main]
//! See `starling_storage::fuzzing::log_recovery` for the property checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_storage::fuzzing::log_recovery(data));
