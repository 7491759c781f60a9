//! libFuzzer on `switchyard_fuzz::chat_template` (scripts/fuzz.sh builds and runs it).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_fuzz::chat_template(data));
