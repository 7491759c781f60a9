//! libFuzzer on `switchyard_fuzz::output_parser` (scripts/fuzz.sh builds and runs it).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_fuzz::output_parser(data));
