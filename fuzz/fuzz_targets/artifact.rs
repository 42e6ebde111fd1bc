//! Fuzz target: the artifact loader's verification (magic, version, checksums, header checks).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::artifact(data));
