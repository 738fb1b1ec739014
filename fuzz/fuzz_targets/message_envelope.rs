#![no_main]
//! See `starling_router::fuzzing::message_envelope` for the property checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_router::fuzzing::message_envelope(data));
