#![no_main]
//! See `starling_storage::fuzzing::segment_index` for the property checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_storage::fuzzing::segment_index(data));
