//! libFuzzer on `switchyard_fuzz::dispatch_frame` (scripts/fuzz.sh builds and runs it).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_fuzz::dispatch_frame(data));
