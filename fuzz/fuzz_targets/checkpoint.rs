//! Fuzz target: the safetensors + config.json loader (input: config, a NUL byte, safetensors).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::checkpoint(data));
