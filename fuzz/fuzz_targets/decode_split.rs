#![no_main]
//! See `starling_protocol::fuzzing::decode_split` for the property checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_protocol::fuzzing::decode_split(data));
