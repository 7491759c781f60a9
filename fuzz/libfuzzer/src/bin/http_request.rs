//! libFuzzer on `switchyard_fuzz::http_request` (scripts/fuzz.sh builds and runs it).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_fuzz::http_request(data));
